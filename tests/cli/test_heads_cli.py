"""`napari-medsam train` and `napari-medsam predict` on tiny files with the tiny test model."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.cli import main
from napari_medsam.core.finetune import read_head_meta
from napari_medsam.io import read_image, write_image, write_labels
from tests._helpers import CLI_STRUCTURES, two_structures

SHAPE = (6, 17, 21)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads_cli")
    vol, lab = two_structures(SHAPE, **CLI_STRUCTURES)
    affine = np.array([[0, 0, 1.5, 10], [0, 0.8, 0, -4], [-1.2, 0, 0, 7], [0, 0, 0, 1]], float)
    ref = read_image(write_image(root / "ref.nii.gz", vol))
    img = write_image(root / "scan.nii.gz", vol, reference=ref.__class__.from_array(vol, affine=affine))
    labels = write_labels(root / "labels.nii.gz", lab)
    npy = root / "other.npy"
    np.save(npy, vol[::-1].copy())
    cache = root / "cache"
    head = root / "model.head.pt"
    rc = main(["train", str(img), str(labels), "--head", "linear", "--model", "test_tiny_lite", "--slices", "1,4",
               "--axis", "0", "--epochs", "3", "--seed", "1", "--class-names", "bright,dark", "--cache-dir",
               str(cache), "-o", str(head)])
    assert rc == 0
    return {"root": root, "img": img, "labels": labels, "npy": npy, "cache": cache, "head": head, "affine": affine}


def test_train_writes_one_head_file(files, capsys):
    meta = read_head_meta(files["head"])
    assert meta.kind == "linear" and meta.backbone == "test_tiny_lite"
    assert meta.training_slices == (1, 4) and meta.axis == 0
    assert meta.class_ids == (1, 2) and meta.class_names == ("bright", "dark")
    assert meta.train_params["seed"] == 1 and meta.train_params["epochs"] == 3


def test_predict_one_input_to_a_file_keeps_geometry(files, tmp_path, capsys):
    out = tmp_path / "pred.nii.gz"
    probs = tmp_path / "probs"
    rc = main(["predict", str(files["img"]), "--head", str(files["head"]), "--cache-dir", str(files["cache"]),
               "--probabilities", str(probs), "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    pred = read_image(out)
    assert pred.shape == SHAPE and pred.dtype == np.uint8
    np.testing.assert_allclose(pred.affine, files["affine"])
    assert set(np.unique(pred.data[...])) <= {0, 1, 2}
    names = sorted(p.name for p in probs.iterdir())
    assert names == [f"pred_prob_{c}.nii.gz" for c in ("background", "bright", "dark")]
    total = sum(np.asarray(read_image(probs / n).data[...], np.float32) for n in names)
    np.testing.assert_allclose(total, 1.0, atol=5e-3)


def test_predict_several_inputs_into_a_folder(files, tmp_path, capsys):
    out = tmp_path / "preds"
    rc = main(["predict", str(files["img"]), str(files["npy"]), "--head", str(files["head"]),
               "--no-disk-cache", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    images = sorted(p.name for p in out.iterdir() if not p.name.endswith((".medsam.json", ".csv")))
    assert images == ["other.npy", "scan.nii.gz"]
    assert np.load(out / "other.npy").shape == SHAPE  # same array order as the input


def test_errors_are_reported_without_traceback(files, tmp_path, capsys):
    bad = write_labels(tmp_path / "bad.nii.gz", np.zeros((6, 17, 20), np.uint8))
    rc = main(["train", str(files["img"]), str(bad), "--head", "cnn", "--model", "test_tiny_lite",
               "--no-disk-cache", "-o", str(tmp_path / "h.pt")])
    assert rc == 1 and "do not match" in capsys.readouterr().err
    rc = main(["predict", str(files["img"]), "--head", str(files["labels"]), "-o", str(tmp_path / "p.nii.gz")])
    assert rc == 1 and "head file" in capsys.readouterr().err
