"""Prompt-free prediction over 2D images and volumes with a trained head."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from napari_medsam.core.build import load_model
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import Cancelled, HeadMismatchError
from napari_medsam.core.finetune import TrainParams, collect_training_data, fine_tune
from napari_medsam.core.infer import encoder_for_head, predict_slices
from napari_medsam.core.progress import drain

SHAPE = (9, 5, 35)  # slices along axis 1 are 9 x 35
# measured 0.938 (GM) / 0.925 (WM) on the 10 evaluation slices (torch 2.14 CPU, seed 0); margin for platforms
DICE_MNI_MIN = 0.85


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(1)
    vol = rng.normal(100, 10, SHAPE).astype(np.float32)
    lab = np.zeros(SHAPE, np.uint16)
    lab[1:5, :, 3:20] = 3
    lab[5:9, :, 20:33] = 300  # a class id above 255: labels come back as uint16
    vol[lab == 3] += 80
    vol[lab == 300] -= 80
    return vol, lab


@pytest.fixture(scope="module")
def setup(loaded, volume):
    enc = VolumeEncoder(loaded, volume[0], axis=1)
    data = drain(collect_training_data(enc, volume[1], [0, 3]))
    params = TrainParams(head="cnn", head_config={"width": 16}, epochs=2, batch_size=2, patience=0)
    return enc, drain(fine_tune(data, params, loaded=loaded, class_names=("x", "y")))


def test_predict_volume_with_probabilities(setup, volume):
    enc, head = setup
    res = drain(predict_slices(enc, head, slices=[1, 2, 4], batch_size=2, return_probs=True))
    assert res.labels.shape == SHAPE and res.labels.dtype == np.uint16
    assert set(np.unique(res.labels)) <= {0, 3, 300}
    assert res.slices == (1, 2, 4) and res.axis == 1 and res.class_names == ("x", "y")
    assert res.probs.shape == (3, *SHAPE) and res.probs.dtype == np.float16
    np.testing.assert_allclose(res.probs[:, :, [1, 2, 4]].astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert not res.probs[:, :, [0, 3]].any() and not res.labels[:, [0, 3]].any()  # not predicted: 0
    # each voxel gets the class of highest probability (up to float16 rounding of near ties)
    probs = res.probs[:, :, [1, 2, 4]].astype(np.float32)
    index = np.searchsorted([0, 3, 300], res.labels[:, [1, 2, 4]])
    chosen = np.take_along_axis(probs, index[None], 0)[0]
    assert (chosen >= probs.max(0) - 2e-3).all()


def test_batch_size_does_not_change_the_result(setup):
    enc, head = setup
    a = drain(predict_slices(enc, head, batch_size=1)).labels
    b = drain(predict_slices(enc, head, batch_size=4)).labels
    np.testing.assert_array_equal(a, b)


def test_predict_a_2d_image(loaded):
    img = np.random.default_rng(2).normal(size=(21, 26)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[3:12, 4:20] = 1
    enc = VolumeEncoder(loaded, img)
    data = drain(collect_training_data(enc, lab))
    head = drain(fine_tune(data, TrainParams(head="linear", epochs=2, patience=0), loaded=loaded))
    res = drain(predict_slices(enc, head, return_probs=True))
    assert res.labels.shape == (21, 26) and res.labels.dtype == np.uint8 and res.probs.shape == (2, 21, 26)


def test_cancel_and_mismatch(setup, volume):
    enc, head = setup
    cancel = threading.Event()
    gen = predict_slices(enc, head, batch_size=1, cancel=cancel)
    next(gen)
    cancel.set()
    with pytest.raises(Cancelled):
        drain(gen)
    other = VolumeEncoder(load_model("test_tiny_vit", device="cpu", precision="fp32"), volume[0], axis=1)
    with pytest.raises(HeadMismatchError, match="test_tiny_lite"):
        drain(predict_slices(other, head))


def test_encoder_for_head_uses_the_training_axis_and_intensity(setup, loaded, volume):
    enc, head = setup
    again = encoder_for_head(loaded, volume[0], head)
    assert again.axis == 1 and again.intensity == enc.intensity
    # a per-volume mapping (MR percentiles) is recomputed on the new volume, with the same rule
    other = encoder_for_head(loaded, volume[0] * 2, head)
    assert other.intensity.mode == enc.intensity.mode and other.intensity.hi != enc.intensity.hi
    ct = dataclasses.replace(head.meta, intensity={"mode": "ct", "lo": -160.0, "hi": 240.0, "keep_zero": False})
    fixed = encoder_for_head(loaded, volume[0] * 2, dataclasses.replace(head, meta=ct))
    assert (fixed.intensity.lo, fixed.intensity.hi) == (-160.0, 240.0)


@pytest.mark.slow
def test_litemedsam_head_segments_mni152_grey_and_white_matter():
    """Train the default head on 3 coronal slices of the MNI152 template, predict 10 others."""
    from nilearn import datasets

    from napari_medsam.io import read_image

    image = read_image(datasets.MNI152_FILE_PATH)
    gm = np.asarray(read_image(datasets.GM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    wm = np.asarray(read_image(datasets.WM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    labels = np.where(gm + wm > 0.5, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    brain = [i for i in range(labels.shape[1]) if labels[:, i].any()]
    train = [brain[round(p)] for p in np.linspace(0, len(brain) - 1, 5)[1:-1]]
    evals = [i for i in brain[10:-10:16] if i not in train]
    loaded = load_model("litemedsam", device="cpu", precision="fp32")
    enc = VolumeEncoder(loaded, image, axis=1)
    data = drain(collect_training_data(enc, labels, train))
    head = drain(fine_tune(data, TrainParams(), loaded=loaded, class_names=("GM", "WM")))
    res = drain(predict_slices(enc, head, slices=evals))
    pred, truth = res.labels[:, evals], labels[:, evals]
    dice = [2 * ((pred == c) & (truth == c)).sum() / ((pred == c).sum() + (truth == c).sum()) for c in (1, 2)]
    assert min(dice) > DICE_MNI_MIN, dice


def test_blank_slices_are_background_without_being_embedded(loaded, volume, monkeypatch):
    from napari_medsam.core import encoder as encoder_mod

    vol, lab = volume
    padded = vol.copy()
    padded[:, 0] = 0.0  # zero padding, as in templates and resampled scans
    padded[:, 4] = 37.5
    enc = VolumeEncoder(loaded, vol, axis=1)
    data = drain(collect_training_data(enc, lab, [0, 3]))
    head = drain(fine_tune(data, TrainParams(head="linear", epochs=2, patience=0), loaded=loaded))
    enc2 = VolumeEncoder(loaded, padded, axis=1)
    embedded = []
    real = encoder_mod.run_encoder
    monkeypatch.setattr(encoder_mod, "run_encoder", lambda ld, batch: (embedded.append(len(batch)), real(ld, batch))[1])
    res = drain(predict_slices(enc2, head, return_probs=True, batch_size=2))
    assert sum(embedded) == SHAPE[1] - 2  # the two blank slices were never embedded
    assert not res.labels[:, 0].any() and not res.labels[:, 4].any()
    assert (res.probs[0, :, 0] == 1).all() and (res.probs[1:, :, 4] == 0).all()
    assert res.labels[:, 1:4].any()  # the others are predicted
    assert res.slices == tuple(range(SHAPE[1]))
