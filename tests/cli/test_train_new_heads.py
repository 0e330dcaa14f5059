"""`napari-medsam train --head hsam|selfprompt` and `predict` with the head file, on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.cli import main
from napari_medsam.core.finetune import read_head_meta
from napari_medsam.io import read_image, write_image, write_labels
from tests._helpers import CLI_STRUCTURES, two_structures

SHAPE = (5, 17, 21)


@pytest.mark.parametrize("kind", ["hsam", "selfprompt"])
def test_train_then_predict(tmp_path, kind, capsys):
    vol, lab = two_structures(SHAPE, **CLI_STRUCTURES)
    img = write_image(tmp_path / "scan.nii.gz", vol)
    labels = write_labels(tmp_path / "labels.nii.gz", lab)
    head = tmp_path / f"{kind}.head.pt"
    cache = tmp_path / "cache"
    rc = main(["train", str(img), str(labels), "--head", kind, "--model", "test_tiny_lite", "--slices", "1,3",
               "--axis", "0", "--epochs", "2", "--cache-dir", str(cache), "-o", str(head)])
    assert rc == 0, capsys.readouterr().err
    meta = read_head_meta(head)
    assert meta.kind == kind and meta.training_slices == (1, 3) and meta.history["steps"] == 2
    out = tmp_path / "pred.nii.gz"
    rc = main(["predict", str(img), "--head", str(head), "--cache-dir", str(cache), "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    pred = read_image(out)
    assert pred.shape == SHAPE and set(np.unique(pred.data[...])) <= {0, 1, 2}
