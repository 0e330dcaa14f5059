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
    COVERAGE_TIE,
    COVERAGE_TIES,
    DEFAULT_SCORE,
    DEFAULT_STRATEGY,
    SCORES,
    STRATEGIES,
    check_score,
    check_strategy,
    coverage_ranking,
    disagreement_score,
    foreground_extent,
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


def test_coverage_splits_the_longest_gap_first_and_picks_the_unsure_slice_near_its_middle():
    flat = np.zeros(21)
    assert [s for s, _ in coverage_ranking(flat, 5)] == [10, 4, 15, 7, 18]  # bisection; ties: lower slice
    # reviewed 10: both halves are 11 long; with tie="score" the one whose middle scores higher goes first (15);
    # with a window, the highest score within the middle third (14..17), not the highest overall (20)
    rising = np.arange(21) / 100
    assert coverage_ranking(rising, 2, exclude=[10], tie="score") == [(15, 0.15), (4, 0.04)]
    assert coverage_ranking(rising, 2, exclude=[10], window=1 / 3, tie="score") == [(17, 0.17), (6, 0.06)]
    assert coverage_ranking(rising, 2, exclude=[10]) == [(4, 0.04), (15, 0.15)]  # the default: the lower run
    # a longer gap wins over a higher score
    spike = np.zeros(21)
    spike[18] = 1.0
    assert coverage_ranking(spike, 1, exclude=[14])[0][0] == 6  # (-1, 14) is longer than (14, 21)
    # never next to a reviewed slice (or another pick) while anything else is left
    assert [s for s, _ in coverage_ranking(np.zeros(5), 5, exclude=[2])] == [0, 4, 1, 3]
    assert [s for s, _ in coverage_ranking(np.zeros(7), 3, exclude=[2, 4], min_gap=2)] == [0, 6, 1]
    # gaps are counted in candidates: a pool of every 4th slice is split like a volume of every slice
    pool = {4 * i + 2: 0.0 for i in range(21)}
    assert [s for s, _ in coverage_ranking(pool, 3, min_gap=1)] == [42, 18, 62]
    # the extent: candidates outside it only when nothing inside is left; NaN is never picked
    scores = np.full(30, 0.5)
    scores[[3, 25]] = 0.9
    scores[12] = np.nan
    got = [s for s, _ in coverage_ranking(scores, 30, extent=(10, 20), min_gap=1)]
    assert got[:10] and all(10 <= s <= 20 for s in got[:10]) and 12 not in got and len(got) == 29
    assert coverage_ranking(scores, 1, extent=(40, 50))[0][0] == 15  # nothing inside: all (12 is not one)
    assert coverage_ranking([], 3) == [] and coverage_ranking([math.nan] * 3, 2) == []


def test_coverage_tie_breaks_between_runs_of_equal_length():
    # reviewed 5 and 16 of 0..26: the runs (5, 16) and (16, 27) are both 11 long, (-1, 5) is 6
    flat = np.zeros(27)
    first = {tie: coverage_ranking(flat, 1, exclude=[5, 16], tie=tie)[0][0] for tie in COVERAGE_TIES}
    # spread: the pick farther from the reviewed slices (21: 16 + 5 away; 10: 5 + 6) goes first;
    # lower: the run nearer slice 0; score: all scores equal, so the lower slice too
    assert first == {"spread": 21, "lower": 10, "score": 10}
    rising = np.arange(27) / 100  # now the higher slices score higher: only score follows that
    assert coverage_ranking(rising, 1, exclude=[5, 16], tie="score")[0][0] == 21
    assert coverage_ranking(rising[::-1].copy(), 1, exclude=[5, 16], tie="score")[0][0] == 10
    assert coverage_ranking(rising[::-1].copy(), 1, exclude=[5, 16], tie="spread")[0][0] == 21
    assert coverage_ranking(rising, 1, exclude=[5, 16], tie="lower")[0][0] == 10
    # a longer run still wins over any tie-break: reviewed 5 and 17, (5, 17) is 12 long, (17, 27) 10
    assert all(coverage_ranking(flat, 1, exclude=[5, 17], tie=t)[0][0] == 11 for t in COVERAGE_TIES)
    # lower reproduces bisection with the lower half first, as evenly spaced slices do
    assert [s for s, _ in coverage_ranking(rising, 5, tie="lower")] == [13, 6, 20, 2, 9]
    # spread: the middle first; then both halves are equally long and equally far from it: the lower one
    assert [s for s, _ in coverage_ranking(flat, 3, tie="spread")] == [13, 6, 20]
    assert COVERAGE_TIE == "lower" and COVERAGE_TIE in COVERAGE_TIES
    with pytest.raises(MedSamError, match="score, spread, lower"):
        coverage_ranking(flat, 1, tie="entropy")


def test_foreground_extent_ignores_specks_and_keeps_reviewed_slices():
    fg = [0, 3, 500, 800, 1000, 10, 0, math.nan]
    assert foreground_extent(fg) == (2, 4)  # 3 and 10 pixels: under 2 % of the largest slice's 1000
    assert foreground_extent(fg, share=0.0) == (1, 5)
    assert foreground_extent(fg, also=[6]) == (2, 6)
    assert foreground_extent({7: 4.0, 9: 0.0}) == (7, 7)
    assert foreground_extent([0, 0, math.nan]) is None
    assert DEFAULT_STRATEGY in STRATEGIES and set(SCORES) < set(STRATEGIES)
    assert check_strategy("coverage") == "coverage"
    with pytest.raises(MedSamError, match="coverage, entropy"):
        check_strategy("entropy-ish")


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
