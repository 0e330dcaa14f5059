"""The review loop: reviewed slices, proposals that never overwrite the user, rounds, suggestions."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from napari_medsam.app.loop import ReviewLoop, RoundParams, dice_score
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import Cancelled, InvalidImageError, MedSamError
from napari_medsam.core.finetune import TrainParams
from napari_medsam.core.progress import drain

FAST = TrainParams(head="linear", max_steps=40, patience=0, threads=0)
AXIS = 1  # coronal slices of the MNI array


@pytest.fixture(scope="module")
def small_mni(mni):
    """A 4x-subsampled MNI152 T1 with GM (1) / WM (2) labels: 50 x 59 x 48, coronal slices 59."""
    t1 = np.asarray(mni["t1"], np.float32)[::4, ::4, ::4]
    gm, wm = mni["gm"][::4, ::4, ::4], mni["wm"][::4, ::4, ::4]
    truth = np.where(gm + wm > 0.5, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    return t1, truth


@pytest.fixture(scope="module", params=["auto", "fp32"])  # auto: bf16 on a CPU with native bf16
def encoder(request, small_mni):
    from napari_medsam.core.build import load_model

    return VolumeEncoder(load_model("test_tiny_lite", device="cpu", precision=request.param), small_mni[0], axis=AXIS)


def sl(i):
    return (slice(None), i, slice(None))


def make_loop(truth, reviewed=(20, 35)):
    labels = np.zeros_like(truth)
    loop = ReviewLoop(labels, axis=AXIS, class_names={1: "GM", 2: "WM"})
    for s in reviewed:
        labels[sl(s)] = truth[sl(s)]
    loop.on_user_edit(reviewed)
    return loop


def test_marking_accepting_and_never_overwriting(small_mni):
    _, truth = small_mni
    loop = make_loop(truth)
    assert loop.reviewed() == (20, 35) and loop.reviewed(0) == ()
    seen = []
    loop.reviewed_changed.connect(seen.append)
    prop = np.full(truth[sl(0)].shape, 2, np.uint8)
    assert loop.set_proposal(10, prop) and loop.set_proposal(11, prop) and loop.set_proposal(12, prop)
    assert not loop.set_proposal(20, prop)  # reviewed: never written
    assert not loop.proposals[sl(20)].any()
    assert loop.accept(10)
    assert np.array_equal(loop.labels[sl(10)], prop) and loop.is_reviewed(10)
    assert not loop.proposals[sl(10)].any() and 10 not in loop.proposed  # a reviewed slice shows no proposal
    assert not loop.accept(10) and not loop.accept(13)  # reviewed already / no proposal
    before = loop.labels[sl(20)].copy()
    assert loop.accept_range(25, 5) == (11, 12)
    assert np.array_equal(loop.labels[sl(20)], before)
    assert seen[-1] == (10, 11, 12, 20, 35)
    assert loop.unmark_reviewed([12]) == (12,) and not loop.is_reviewed(12)
    with pytest.raises(InvalidImageError, match="outside"):
        loop.mark_reviewed([59])


def test_auto_round_is_due_after_n_new_reviews(small_mni):
    _, truth = small_mni
    loop = ReviewLoop(np.zeros_like(truth), axis=AXIS, auto_every=3)
    due = []
    loop.round_due.connect(due.append)
    loop.mark_reviewed([1, 2])
    assert due == []
    loop.on_user_edit([2])  # already reviewed: not new
    assert due == []
    loop.mark_reviewed([7])
    assert due == [3]


def test_rounds_train_on_reviewed_slices_only_and_warm_start(small_mni, encoder):
    _, truth = small_mni
    loop = make_loop(truth)
    reviewed_before = {s: loop.labels[sl(s)].copy() for s in loop.reviewed()}
    other = loop.labels.copy()
    progress = []
    gen = loop.round_steps(encoder, RoundParams(train=FAST, cv_folds=2), current=lambda: 30)
    try:
        while True:
            progress.append(next(gen))
    except StopIteration as stop:
        rec1 = stop.value
    assert rec1.index == 1 and rec1.reviewed == (20, 35)
    assert rec1.head.meta.training_slices == (20, 35) and rec1.head.meta.class_ids == (1, 2)
    assert rec1.head.meta.class_names == ("GM", "WM")
    # the labels are never written by a round; proposals only on unreviewed slices
    assert np.array_equal(loop.labels, other)
    assert all(np.array_equal(loop.labels[sl(s)], a) for s, a in reviewed_before.items())
    assert not loop.proposals[sl(20)].any() and not loop.proposals[sl(35)].any()
    assert set(loop.proposed) == set(range(59)) - {20, 35}
    # the slice in view came first
    first = next(p for p in progress if p.info.get("phase") == "predict" and p.info.get("slices"))
    assert 30 in first.info["slices"]
    assert {p.info.get("phase") for p in progress} >= {"train", "predict", "cv"}
    m1 = rec1.metrics
    assert m1["n_reviewed"] == 2 and math.isnan(m1["proposal_dice"]) and 0.0 <= m1["cv_dice"] <= 1.0
    ranked = loop.suggest(4, strategy="entropy")
    assert len(ranked) == 4 and all(s not in (20, 35) for s, _ in ranked)
    assert all(abs(a - b) >= 2 for i, (a, _) in enumerate(ranked) for b, _ in ranked[i + 1:])
    assert [v for _, v in ranked] == sorted((v for _, v in ranked), reverse=True)
    # the default, coverage: inside the predicted foreground, the longest gap split first, no neighbours
    extent = loop.foreground_extent()
    fg = [s for s in range(59) if loop.proposals[sl(s)].any() or s in (20, 35)]
    assert extent is not None and fg[0] <= extent[0] <= 20 and 35 <= extent[1] <= fg[-1]
    cover = loop.suggest(4)
    picks = [s for s, _ in cover]
    assert len(picks) == 4 and all(extent[0] <= s <= extent[1] for s in picks)
    assert all(abs(a - b) >= 2 for i, a in enumerate(picks) for b in [20, 35, *picks[i + 1:]])
    gaps = {(extent[0] - 1, 20): 21 - extent[0], (20, 35): 15, (35, extent[1] + 1): extent[1] + 1 - 35}
    (a, b), _ = max(gaps.items(), key=lambda kv: kv[1])
    assert a < picks[0] < b and abs(picks[0] - (a + b) / 2) <= 0.5  # its middle slice
    assert all(v == loop.scores["entropy"][s] for s, v in cover)

    # the user corrects two suggested slices to the truth: the next round measures their edits
    s1, s2 = ranked[0][0], ranked[1][0]
    shown = {s: loop.proposals[sl(s)].copy() for s in (s1, s2)}
    for s in (s1, s2):
        loop.labels[sl(s)] = truth[sl(s)]
    loop.on_user_edit([s1, s2])
    rec2 = drain(loop.round_steps(encoder, RoundParams(train=FAST, cv_folds=0, strategy="tta")))
    m2 = rec2.metrics
    pred = np.stack([shown[s] for s in sorted(shown)])
    ref = np.stack([truth[sl(s)] for s in sorted(shown)])
    assert m2["n_new"] == 2 and m2["n_compared"] == 2
    assert m2["proposal_dice"] == pytest.approx(dice_score(pred, ref))
    assert m2["voxels_changed"] == int(np.count_nonzero(pred != ref))
    assert m2["warm_start"] and "continued_from" in rec2.head.meta.history
    assert rec2.head.meta.training_slices == tuple(sorted({20, 35, s1, s2}))
    assert "cv_dice" not in m2
    assert np.isfinite(loop.scores["tta"][[s for s in range(59) if not loop.is_reviewed(s)]]).all()
    assert np.isfinite(loop.scores["disagreement"][0])  # proposed twice: compared


def test_a_slice_reviewed_during_a_round_is_not_touched(small_mni, encoder):
    _, truth = small_mni
    loop = make_loop(truth)
    gen = loop.round_steps(encoder, RoundParams(train=FAST, cv_folds=0, batch_size=4), current=lambda: 0)
    for p in gen:
        if p.info.get("phase") == "predict":
            break
    loop.labels[sl(50)] = 7  # the user paints slice 50 while the round predicts
    loop.on_user_edit([50])
    rec = drain(gen)
    assert (loop.labels[sl(50)] == 7).all() and not loop.proposals[sl(50)].any() and 50 not in loop.proposed
    assert rec.reviewed == (20, 35)  # trained on the snapshot taken when it started


def test_cancel_records_no_round(small_mni, encoder):
    _, truth = small_mni
    loop = make_loop(truth)
    cancel = threading.Event()
    gen = loop.round_steps(encoder, RoundParams(train=FAST), cancel=cancel)
    next(gen)
    cancel.set()
    with pytest.raises(Cancelled):
        drain(gen)
    assert loop.rounds == []


def test_a_round_needs_reviewed_labelled_slices_and_the_right_encoder(small_mni, encoder, tiny_lite):
    _, truth = small_mni
    with pytest.raises(InvalidImageError, match="no reviewed slices"):
        drain(ReviewLoop(np.zeros_like(truth), axis=AXIS).round_steps(encoder))
    empty = ReviewLoop(np.zeros_like(truth), axis=AXIS)
    empty.mark_reviewed([3])
    with pytest.raises(InvalidImageError, match="hold no labels"):
        drain(empty.round_steps(encoder, RoundParams(train=FAST)))
    other = ReviewLoop(np.zeros_like(truth), axis=0)
    other.mark_reviewed([3])
    with pytest.raises(MedSamError, match="along the loop's axis"):
        drain(other.round_steps(encoder))
    with pytest.raises(MedSamError, match="unknown suggestion strategy"):
        drain(make_loop(truth).round_steps(encoder, RoundParams(strategy="vibes")))
    with pytest.raises(MedSamError, match="coverage"):
        make_loop(truth).suggest(3, strategy="vibes")


def test_a_new_class_in_a_later_round_grows_the_head(small_mni, encoder):
    _, truth = small_mni
    loop = make_loop(truth)
    drain(loop.round_steps(encoder, RoundParams(train=FAST, cv_folds=0)))
    loop.labels[sl(40)] = truth[sl(40)]
    loop.labels[sl(40)][:5, :5] = 3
    loop.on_user_edit([40])
    rec = drain(loop.round_steps(encoder, RoundParams(train=FAST, cv_folds=0)))
    assert rec.head.meta.class_ids == (1, 2, 3) and rec.metrics["warm_start"]


def test_state_round_trip(small_mni, encoder):
    _, truth = small_mni
    loop = make_loop(truth)
    drain(loop.round_steps(encoder, RoundParams(train=FAST, cv_folds=0)))
    loop.mark_reviewed([5])
    loop.mark_reviewed([2], axis=0)
    back = ReviewLoop.from_state(loop.state(), loop.labels.copy(), loop.proposals.copy(),
                                 heads=[r.head for r in loop.rounds], pending=loop.pending())
    assert back.reviewed() == loop.reviewed() and back.reviewed(0) == (2,)
    assert back.proposed == loop.proposed and back.class_names == {1: "GM", 2: "WM"}
    assert len(back.rounds) == 1 and back.rounds[0].metrics["n_reviewed"] == 2
    assert back.head is loop.head and back.new_since_round == 1
    assert set(back.pending()) == {5}
