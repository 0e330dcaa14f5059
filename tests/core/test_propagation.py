"""Propagation that stops where the structure ends, in a slice range, with proposals and scores."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import Cancelled, PromptError
from napari_medsam.core.progress import drain
from napari_medsam.core.propagation import (
    Propagation,
    PropagationParams,
    SliceScore,
    _grow,
    parse_range,
    plan_update,
    propagate,
)
from napari_medsam.core.segment import Prompt2D, box_of
from tests.conftest import dice

OPEN = PropagationParams.permissive()


@pytest.fixture()
def enc(tiny_lite):
    rng = np.random.default_rng(0)
    return VolumeEncoder(tiny_lite, rng.random((9, 45, 31)).astype(np.float32))


def test_result_is_a_mapping_with_seeds_scores_and_stops(enc):
    out = drain(propagate(enc, {4: Prompt2D.from_box((5, 4, 30, 20))}, params=OPEN))
    assert isinstance(out, Propagation)
    assert 4 in out and out.seeds == (4,) and set(out.proposals) == set(out) - {4}
    assert dict(out.items()).keys() == out.masks.keys() == out.scores.keys()
    for z, m in out.items():
        assert m.shape == (45, 31) and m.dtype == bool and m.any()
        s = out.scores[z]
        assert s.distance == abs(z - 4) and s.area == int(m.sum()) and 0.0 <= s.confidence <= 1.0
    assert {s.direction for s in out.stops} == {-1, 1}
    assert out.span == (0, 9)


def test_range_bounds_what_is_written_and_visited(enc):
    out = drain(propagate(enc, {4: Prompt2D.from_box((5, 4, 30, 20))}, params=OPEN, start=3, stop=6))
    assert set(out) <= {3, 4, 5}
    assert enc.cached_indices() <= {3, 4, 5}
    assert out.span == (3, 6)
    with pytest.raises(PromptError, match="outside the range"):
        drain(propagate(enc, {4: Prompt2D.from_box((5, 4, 30, 20))}, start=5, stop=9))
    with pytest.raises(PromptError, match="range"):
        drain(propagate(enc, {4: Prompt2D.from_box((5, 4, 30, 20))}, start=4, stop=4))


def test_legacy_rule_equals_the_permissive_run_truncated(enc):
    """A stricter rule only cuts runs short: its masks are the permissive run's on fewer slices."""
    seeds = {4: Prompt2D.from_box((5, 4, 30, 20))}
    wide = drain(propagate(enc, seeds, params=OPEN))
    strict = drain(propagate(enc, seeds, params=dataclasses.replace(OPEN, min_inside=0.99, max_area_ratio=1.05)))
    assert set(strict) <= set(wide)
    for z in strict:
        np.testing.assert_array_equal(strict[z], wide[z])


def _score(**kw):
    base = {"seed": 0, "distance": 1, "area": 100, "iou": 0.9}
    return SliceScore(**{**base, **kw})


@pytest.mark.parametrize(("kw", "reason"), [
    ({}, None),
    ({"area": 1}, "vanished"),
    ({"iou": 0.1}, "predicted IoU"),
    ({"area_ratio": 0.1}, "area collapsed"),
    ({"area_ratio": 5.0}, "area grew"),
    ({"inside": 0.2}, "jumped"),
    ({"intensity_z": 9.0}, "intensity"),
    ({"feature": 0.1}, "features"),
    ({"intensity_z": float("nan"), "feature": float("nan")}, None),  # not measurable: no verdict
])
def test_stop_reasons(kw, reason):
    assert PropagationParams().stop_reason(_score(**kw), seed_area=100) == reason
    assert PropagationParams.legacy().stop_reason(_score(**kw), seed_area=100) in (
        reason if reason in (None, "vanished", "predicted IoU") else None,)


def test_plan_update_replaces_unreviewed_proposals_only():
    m = np.ones((2, 2), bool)
    new = {3: m, 4: m, 5: m}
    write, clear = plan_update(new, proposals={5, 6, 7}, reviewed={4, 7})
    assert set(write) == {3, 5}  # never a reviewed slice
    assert clear == {5, 6}  # old proposals go, also where the new run stops short (6); reviewed 7 stays


def test_parse_range():
    assert parse_range("10:20", 50) == (10, 20)
    assert parse_range(":5", 50) == (0, 5)
    assert parse_range("40:", 50) == (40, 50)
    assert parse_range("-5:", 50) == (45, 50)
    for bad in ("5", "a:b", "20:10", "1:2:3"):
        with pytest.raises(PromptError):
            parse_range(bad, 50)
    assert parse_range("10:20", 50, inclusive=True) == (10, 21)
    assert parse_range("10:10", 50, inclusive=True) == (10, 11)
    assert parse_range("-1:-1", 50, inclusive=True) == (49, 50)
    assert parse_range("5:-2", 50, inclusive=True) == (5, 49)
    assert parse_range(":", 50, inclusive=True) == (0, 50)
    with pytest.raises(PromptError, match="holds no slice"):
        parse_range("60:70", 50, inclusive=True)


def test_grow():
    m = np.zeros((7, 7), bool)
    m[3, 3] = True
    g = _grow(m, 1.5)
    assert g.sum() == 25 and g[1:6, 1:6].all()


def test_propagation_visits_only_needed_slices_and_cancels(enc):
    seeds = {4: Prompt2D.from_box((5, 4, 30, 20))}
    params = dataclasses.replace(OPEN, max_slices=2)
    out = drain(propagate(enc, seeds, params=params))
    assert set(out) <= {2, 3, 4, 5, 6} and 4 in out
    assert enc.cached_indices() <= {2, 3, 4, 5, 6}
    stop = threading.Event()
    gen = propagate(enc, seeds, params=params, cancel=stop)
    next(gen)
    stop.set()
    with pytest.raises(Cancelled):
        while True:
            next(gen)


def test_propagation_between_two_seeds_covers_the_gap(enc):
    out = drain(propagate(enc, {1: Prompt2D.from_box((5, 4, 40, 28)), 6: Prompt2D.from_box((5, 4, 40, 28))},
                          params=OPEN))
    gap = range(2, 6)  # the slices between the seeds: the seeds themselves are always in the output
    assert set(gap) <= set(out) and all(out[z].any() for z in gap)
    assert out.seeds == (1, 6) and set(out.proposals) >= set(gap)


def test_propagation_needs_a_seed(enc):
    with pytest.raises(PromptError):
        drain(propagate(enc, {}))
    with pytest.raises(PromptError):
        drain(propagate(enc, {20: Prompt2D.from_box((1, 1, 5, 5))}))


@pytest.mark.slow
def test_real_propagation_on_mni_brain(litemedsam, mni):
    """One box on coronal slice 93, propagated +-10 slices with the default stop rule."""
    enc = VolumeEncoder(litemedsam, mni["t1"], axis=1)
    z = 93
    gt = mni["brain"][:, z, :]
    out = drain(propagate(enc, {z: Prompt2D.from_box(box_of(gt))}, params=PropagationParams(max_slices=10)))
    zs = range(z - 10, z + 11)
    pred = np.stack([out.get(k, np.zeros_like(gt)) for k in zs])
    ref = np.stack([mni["brain"][:, k, :] for k in zs])
    assert set(out) <= set(zs)
    assert dice(pred, ref) > 0.65
