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


def test_a_head_on_adapted_embeddings_predicts_only_with_its_adapter(files, tmp_path, capsys):
    from napari_medsam.core.finetune import read_head_meta

    adapter = tmp_path / "a.pt"
    common = ["--model", "test_tiny_lite", "--axis", "1", "--threads", "1", "--no-disk-cache"]
    assert main(["train", str(files["img"]), str(files["labels"]), "--adapter", "medsa", "--slices", "2,5",
                 "--steps", "2", *common, "-o", str(adapter)]) == 0
    head = tmp_path / "h.head"
    plain = tmp_path / "plain.head"
    for out, extra in ((head, ["--with-adapter", str(adapter)]), (plain, [])):
        assert main(["train", str(files["img"]), str(files["labels"]), "--head", "linear", "--slices", "2,5",
                     "--epochs", "1", *extra, *common, "-o", str(out)]) == 0
    capsys.readouterr()
    digest = read_adapter_meta(adapter).digest
    assert read_head_meta(head).adapter == digest and read_head_meta(plain).adapter == ""

    pred = ["predict", str(files["img"]), "--no-disk-cache"]
    rc = main([*pred, "--head", str(head), "-o", str(tmp_path / "missing.nii.gz")])
    err = capsys.readouterr().err
    assert rc != 0 and "--adapter FILE" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "missing.nii.gz").exists()
    rc = main([*pred, "--head", str(plain), "--adapter", str(adapter), "-o", str(tmp_path / "extra.nii.gz")])
    assert rc != 0 and "drop --adapter" in capsys.readouterr().err

    out = tmp_path / "pred.nii.gz"
    rc = main([*pred, "--head", str(head), "--adapter", str(adapter), "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert read_image(out).shape == files["lab"].shape
