"""`napari-medsam train --adapter ...` writes an adapter file; `segment --adapter FILE` uses it (tiny model, MNI152 block)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.cli import main
from napari_medsam.core.adapt import read_adapter_meta
from napari_medsam.io import read_image, write_image, write_labels


@pytest.fixture(scope="module")
def files(tmp_path_factory, mni):
    root = tmp_path_factory.mktemp("adapters_cli")
    sl = slice(100, 108)
    t1 = np.ascontiguousarray(mni["t1"][:, sl, :]).astype(np.float32)
    lab = mni["brain"][:, sl, :].astype(np.uint8)
    img = write_image(root / "t1.nii.gz", t1)
    labels = write_labels(root / "brain.nii.gz", lab)
    return {"root": root, "img": img, "labels": labels, "lab": lab}


@pytest.mark.parametrize("extra", [["--adapter", "medsa", "--hyp"], ["--adapter", "lora", "--rank", "2", "--sd-trans"]],
                         ids=["medsa+hyp", "lora+sd"])
def test_train_adapter_then_segment_with_it(files, extra, tmp_path, capsys):
    out = tmp_path / "brain.adapter.pt"
    rc = main(["train", str(files["img"]), str(files["labels"]), *extra, "--model", "test_tiny_lite", "--axis", "1",
               "--slices", "2,5", "--steps", "2", "--threads", "1", "--no-disk-cache", "-o", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "estimated" in cap.err and "wrote" in cap.out
    meta = read_adapter_meta(out)
    assert meta.backbone == "test_tiny_lite" and meta.training_slices == (2, 5) and meta.axis == 1
    assert meta.adapter.kind == extra[1] and meta.history["steps"] == 2
    seg = tmp_path / "seg.nii.gz"
    r0, c0 = np.argwhere(files["lab"][:, 3]).min(0)
    r1, c1 = np.argwhere(files["lab"][:, 3]).max(0) + 1
    rc = main(["segment", str(files["img"]), "--model", "test_tiny_lite", "--adapter", str(out), "--axis", "1",
               "--box", f"3,{r0},{c0},{r1},{c1}", "--no-disk-cache", "-o", str(seg)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "using adapter" in cap.err
    assert read_image(seg).shape == files["lab"].shape


def test_segment_refuses_an_adapter_for_another_model(files, tmp_path, capsys):
    out = tmp_path / "a.pt"
    assert main(["train", str(files["img"]), str(files["labels"]), "--adapter", "medsa", "--model", "test_tiny_lite",
                 "--axis", "1", "--slices", "4", "--steps", "1", "--threads", "1", "--no-disk-cache", "-o", str(out)]) == 0
    capsys.readouterr()
    rc = main(["segment", str(files["img"]), "--model", "test_tiny_vit", "--adapter", str(out), "--axis", "1",
               "--box", "3,10,10,60,60", "--no-disk-cache", "-o", str(tmp_path / "s.nii.gz")])
    assert rc != 0
    assert "test_tiny_lite" in capsys.readouterr().err
