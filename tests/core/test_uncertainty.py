"""Per-slice uncertainty scores and spread-out ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import MedSamError
from napari_medsam.core.finetune import TrainParams, collect_training_data, fine_tune
from napari_medsam.core.progress import drain
from napari_medsam.core.uncertainty import (
    DEFAULT_SCORE,
    SCORES,
    check_score,
    disagreement_score,
    rank_slices,
    slice_scores,
    tta_scores,
)


def probs_of(fg: np.ndarray) -> np.ndarray:
    """(2, H, W) probabilities with foreground probability ``fg``."""
    return np.stack([1.0 - fg, fg]).astype(np.float32)


def test_confident_slices_score_low_and_unsure_foreground_high():
    sure = np.zeros((10, 10))
    sure[2:8, 2:8] = 1.0
    unsure = np.zeros((10, 10))
    unsure[2:8, 2:8] = 0.5
    assert slice_scores(probs_of(sure)) == {"entropy": pytest.approx(0.0, abs=1e-4), "margin": pytest.approx(0.0, abs=1e-4)}
    s = slice_scores(probs_of(unsure))
    # 36 of 100 pixels with entropy log 2 (normalised: 1) and margin 0
    assert s["entropy"] == pytest.approx(0.36, abs=1e-4) and s["margin"] == pytest.approx(0.36, abs=1e-4)
    empty = slice_scores(probs_of(np.zeros((4, 4))))
    assert empty == {"entropy": 0.0, "margin": 0.0}
    three = np.full((3, 4, 4), 1 / 3, np.float32)
    assert slice_scores(three)["entropy"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(MedSamError, match="K >= 2"):
        slice_scores(np.ones((1, 4, 4)))


def test_disagreement_is_the_share_of_changed_pixels():
    a = np.zeros((4, 5), np.uint8)
    b = a.copy()
    b[0, :2] = 1
    assert disagreement_score(a, b) == pytest.approx(2 / 20)
    assert disagreement_score(a, a) == 0.0
    with pytest.raises(MedSamError):
        disagreement_score(a, a[:2])


def test_rank_spreads_picks_and_skips_excluded_and_nan():
    scores = [0.1, 0.9, 0.85, 0.8, math.nan, 0.7, 0.2]
    assert rank_slices(scores, 3) == [(1, 0.9), (3, 0.8), (5, 0.7)]  # 2 neighbours 1: skipped
    assert rank_slices(scores, 3, min_gap=1) == [(1, 0.9), (2, 0.85), (3, 0.8)]
    assert rank_slices(scores, 2, exclude=[1]) == [(2, 0.85), (5, 0.7)]
    assert rank_slices({10: 0.5, 12: 0.5, 11: 0.1}, 5, min_gap=3) == [(10, 0.5)]
    assert rank_slices([], 3) == []
    assert DEFAULT_SCORE in SCORES and check_score("tta") == "tta"
    with pytest.raises(MedSamError, match="choose one of"):
        check_score("nope")


def test_tta_variance_is_zero_for_a_shift_invariant_head_and_positive_for_a_trained_one(tiny_lite, mni):
    t1 = np.asarray(mni["t1"], np.float32)[::6, ::6, ::6]
    brain = mni["brain"][::6, ::6, ::6].astype(np.uint8)
    enc = VolumeEncoder(tiny_lite, t1, axis=2)
    data = drain(collect_training_data(enc, brain, [15]))
    head = drain(fine_tune(data, TrainParams(head="cnn", max_steps=20, patience=0, threads=0), loaded=tiny_lite))
    got = tta_scores(enc, head, [10, 16])
    assert set(got) == {10, 16} and all(v > 0 for v in got.values())
    for p in head.module.parameters():  # a head that ignores its input: every pass agrees
        p.data.zero_()
    assert all(v == pytest.approx(0.0, abs=1e-10) for v in tta_scores(enc, head, [10]).values())
