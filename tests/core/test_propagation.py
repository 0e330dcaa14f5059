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
    LARGE_SEED,
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

#: No stop but a vanishing mask, one carry for every seed (``large_seed=None``: the tests below script a
#: carry; on these 45 x 31 slices every seed's box is a large one).
OPEN = PropagationParams.permissive(large_seed=None)


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


# --- what is carried from slice to slice (issue 16) ---------------------------------------------

def _scripted(monkeypatch, enc, outputs):
    """Make ``enc`` and the decoder scripted: ``outputs(z, prompt)`` -> the decoder's masks on slice
    z (index 0 the single-mask output). Returns the list of (z, prompt) the decoder was asked."""
    import torch

    from napari_medsam.core import propagation as prop
    from napari_medsam.core.segment import MaskResult

    shape = tuple(enc.get(0).shape)
    monkeypatch.setattr(enc, "get", lambda z: torch.full(shape, float(z)))
    asked = []

    def result(m):
        m, iou = m if isinstance(m, tuple) else (m, 0.9)  # an output may come with its predicted IoU
        return MaskResult(mask=m, logits=np.where(np.resize(m, (64, 64)), 1.0, -1.0).astype(np.float32),
                          iou=iou, prob=m.astype(np.float32))

    def fake_all(loaded, emb, tf, prompt, return_prob=False):
        z = int(emb.flatten()[0])
        asked.append((z, prompt))
        return [result(m) for m in outputs(z, prompt)]

    monkeypatch.setattr(prop, "decode_all", fake_all)
    monkeypatch.setattr(prop, "decode", lambda loaded, emb, tf, prompts, **kw: fake_all(loaded, emb, tf, prompts[0])[:1])
    return asked


def _square(r0, c0, r1, c1):
    m = np.zeros((45, 31), bool)
    m[r0:r1, c0:c1] = True
    return m


OBJECT = {z: _square(8, 4, 20, 14) for z in range(2, 7)}  # the structure: slices 2..6
OTHER = _square(26, 18, 38, 28)  # a neighbour on every slice, not touching it


def test_connect_drops_pieces_not_joined_to_the_object_and_stops_at_its_end(monkeypatch, enc):
    """The decoder also marks a separate neighbour (a vessel beside a tumour): carried as one mask,
    its box takes in the neighbour and the run never ends; keeping the pieces joined to the previous
    mask stops where the object ends."""
    _scripted(monkeypatch, enc, lambda z, p: [OBJECT.get(z, np.zeros((45, 31), bool)) | OTHER])
    seed = {4: Prompt2D.from_box((8, 4, 20, 14))}
    old = drain(propagate(enc, seeds=seed, params=dataclasses.replace(OPEN, connect=False)))
    new = drain(propagate(enc, seeds=seed, params=dataclasses.replace(OPEN, connect=True)))
    assert set(old) == set(range(9))  # ran to both ends of the volume on the neighbour
    assert set(new) == set(range(2, 7))
    for z in new.proposals:
        np.testing.assert_array_equal(new[z], OBJECT[z])
    assert {s.reason for s in new.stops} == {"vanished"}


def test_choose_previous_keeps_the_output_most_like_the_previous_mask(monkeypatch, enc):
    """The decoder's first output jumps to the neighbour on slice 5; another output is the object."""
    def outputs(z, p):
        obj = OBJECT.get(z, np.zeros((45, 31), bool))
        return [OTHER if z == 5 else obj, obj, OTHER | obj]

    _scripted(monkeypatch, enc, outputs)
    seed = {4: Prompt2D.from_box((8, 4, 20, 14))}
    first = drain(propagate(enc, seeds=seed, params=dataclasses.replace(OPEN, choose="first")))
    prev = drain(propagate(enc, seeds=seed, params=dataclasses.replace(OPEN, choose="previous")))
    np.testing.assert_array_equal(first[5], OTHER)
    for z in range(2, 7):
        np.testing.assert_array_equal(prev[z], OBJECT[z])


def test_carry_point_is_a_positive_point_deep_inside_the_previous_mask(monkeypatch, enc):
    ring = _square(6, 4, 30, 26) & ~_square(10, 8, 26, 22)  # its centroid lies in the hole
    asked = _scripted(monkeypatch, enc, lambda z, p: [ring])
    drain(propagate(enc, {4: Prompt2D.from_box((6, 4, 30, 26))},
                    params=dataclasses.replace(OPEN, carry_point=True, max_slices=1)))
    carried = [p for z, p in asked if z != 4]
    assert carried
    for p in carried:
        assert p.box is not None and p.n_points == 1 and p.labels.tolist() == [1]
        r, c = np.round(p.points[0]).astype(int)
        assert ring[r, c]


def test_choose_rejects_unknown_names(enc):
    with pytest.raises(PromptError, match="choose"):
        drain(propagate(enc, {4: Prompt2D.from_box((5, 4, 30, 20))}, params=dataclasses.replace(OPEN, choose="best")))


def test_contrast_deepest_point_and_connected():
    from napari_medsam.core.propagation import _connected, _contrast, _deepest_point

    img = np.zeros((20, 20), np.float32)
    img[5:15, 5:15] = 10.0
    exact = img > 5
    assert _contrast(img, exact, None) == pytest.approx(1.0)
    assert _contrast(img, _square(0, 0, 20, 10)[:20, :20], None) < 0.5
    assert _contrast(img, np.zeros_like(exact), None) == 0.0
    assert _contrast(img, exact, (5, 5, 15, 15)) == 0.0  # the box holds only the object: nothing split
    L = np.zeros((20, 20), bool)
    L[2:18, 2:6] = True
    L[14:18, 2:18] = True
    r, c = _deepest_point(L).astype(int)
    assert L[r, c]
    pieces = np.zeros((20, 20), bool)
    pieces[1:4, 1:4] = True
    pieces[10:15, 10:15] = True
    near = np.zeros((20, 20), bool)
    near[12, 12] = True
    kept = _connected(pieces, near)
    assert kept[10:15, 10:15].all() and not kept[1:4, 1:4].any()
    assert not _connected(pieces, ~pieces & ~_grow(pieces, 1)).any()


def test_legacy_carries_the_first_output_as_a_box():
    legacy = PropagationParams.legacy()
    assert (legacy.choose, legacy.seed_choose, legacy.carry_point, legacy.connect) == ("first", "first", False, False)
    default, open_ = PropagationParams(), PropagationParams.permissive()
    for key in ("choose", "seed_choose", "carry_point", "connect", "margin", "margin_frac", "use_logits"):
        assert getattr(open_, key) == getattr(default, key)  # tuning simulates the default's carry


# --- carries and stops relative to the seed (issue 16, third pass) ------------------------------

def test_relative_iou_floor_judges_an_output_on_its_own_scale(monkeypatch, enc):
    """The object's multimask output has a predicted IoU of ~0.2 everywhere (the single-mask output
    ~0.8): chosen, the absolute floor (0.35) stops it at once; a floor relative to the seed's IoU
    for the same output keeps it to where its IoU really falls (slice 7: 0.05 / 0.2)."""
    empty = np.zeros((45, 31), bool)

    def outputs(z, p):
        obj = OBJECT.get(z, empty)
        return [(obj if z == 4 else OTHER, 0.8), (obj if obj.any() else _square(8, 4, 12, 8), 0.2 if obj.any() else 0.05)]

    _scripted(monkeypatch, enc, outputs)
    seed = {4: Prompt2D.from_box((8, 4, 20, 14))}
    carry = {"choose": "previous", "large_seed": None}
    absolute = drain(propagate(enc, seed, params=PropagationParams(**carry, min_iou=0.35, min_feature=None)))
    relative = drain(propagate(enc, seed, params=PropagationParams(**carry, min_iou=None, min_iou_rel=0.5,
                                                                   min_feature=None)))
    assert set(absolute) == {4}
    assert set(relative) == set(range(2, 7))
    assert {s.output for z, s in relative.scores.items() if z != 4} == {1}
    assert all(s.iou_rel == pytest.approx(1.0) for s in relative.scores.values())
    assert {s.reason for s in relative.stops} == {"predicted IoU below the seed's"}
    assert PropagationParams().min_iou_rel is None  # off by default until measured


def test_box_limits_relative_to_the_seed(monkeypatch, enc):
    """A decoder that leaks a pixel around its box on every slice: the carried box grows without
    bound; capped at 1.5x the seed's box, or clipped to the seed's box grown by 25 %, it does not."""
    def leak(z, p):
        m = np.zeros((45, 31), bool)
        r0, c0, r1, c1 = (int(round(v)) for v in p.box)
        m[max(r0 - 1, 0):r1 + 1, max(c0 - 1, 0):c1 + 1] = True
        return [m]

    seed = {4: Prompt2D.from_box((16, 12, 24, 18))}  # seed mask rows 15..25, cols 11..19: 10 x 8
    sizes = {}
    for key, value in (("max_box_growth", None), ("max_box_growth", 1.5), ("box_within", 0.25)):
        asked = _scripted(monkeypatch, enc, leak)
        drain(propagate(enc, seed, params=dataclasses.replace(OPEN, **{key: value})))
        boxes = [p.box for z, p in asked if z != 4]
        sizes[(key, value)] = max(max(b[2] - b[0], b[3] - b[1]) for b in boxes)
        if key == "box_within":
            for r0, c0, r1, c1 in boxes:
                assert r0 >= 15 - 2.5 - 1e-6 and r1 <= 25 + 2.5 + 1e-6 and c0 >= 11 - 2 - 1e-6 and c1 <= 19 + 2 + 1e-6
    assert sizes[("max_box_growth", None)] > 20
    assert sizes[("max_box_growth", 1.5)] <= 1.5 * 10 + 1e-6
    assert sizes[("box_within", 0.25)] <= 10 * 1.5 + 1e-6


def test_similar_carries_the_box_from_the_part_like_the_seed(monkeypatch, enc):
    """The decoder adds a piece of other tissue (a different embedding) joined to the object on each
    slice: carried whole, the box takes it in; with ``similar_q`` the box is carried from the part
    whose embedding is like the seed mask's."""
    import torch

    from napari_medsam.core.propagation import _cells_to_original

    tf = enc.transform()
    g = 16
    obj = _square(8, 4, 20, 14)
    leak = _square(20, 4, 34, 14)  # below the object, touching it
    cells_obj = np.zeros((g, g), bool)  # the cells whose pixels are the object's
    for i in range(g):
        for j in range(g):
            one = np.zeros((g, g), bool)
            one[i, j] = True
            cells_obj[i, j] = (_cells_to_original(one, tf) & obj).any()
    emb = np.zeros((1, 32, g, g), np.float32)
    emb[0, 1][cells_obj] = 10.0
    emb[0, 2][~cells_obj] = 10.0
    asked = _scripted(monkeypatch, enc, lambda z, p: [obj if z == 4 else obj | leak])

    def get(z):
        e = torch.from_numpy(emb.copy())
        e[0, 0, 0, 0] = float(z) * 1e-3  # the scripted decoder reads the slice from here (not an object cell)
        return e

    monkeypatch.setattr(enc, "get", get)
    from napari_medsam.core import propagation as prop

    def logits_of(m):  # model-frame logits that hold the mask's geometry (64 x 64, scale 64 / 45)
        rows = np.minimum((np.arange(64) / tf.scale_rc[0]).astype(int), 44)
        cols = np.minimum((np.arange(64) / tf.scale_rc[1]).astype(int), 30)
        inside = (np.arange(64)[:, None] < tf.resized[0]) & (np.arange(64)[None] < tf.resized[1])
        return np.where(m[np.ix_(rows, cols)] & inside, 1.0, -1.0).astype(np.float32)

    def fake_all(loaded, e, tf_, prompt, return_prob=False):
        z = round(float(e.flatten()[0]) * 1e3)
        asked.append((z, prompt))
        m = obj if z == 4 else obj | leak
        return [prop.MaskResult(mask=m, logits=logits_of(m), iou=0.9, prob=m.astype(np.float32))]

    monkeypatch.setattr(prop, "decode_all", fake_all)
    monkeypatch.setattr(prop, "decode", lambda loaded, e, tf_, prompts, **kw: fake_all(loaded, e, tf_, prompts[0]))
    seed = {4: Prompt2D.from_box((8, 4, 20, 14))}
    for q, bottom in ((None, 34), (0.1, 20)):
        asked.clear()
        drain(propagate(enc, seed, params=dataclasses.replace(OPEN, similar_q=q, max_slices=2)))
        carried = [p.box for z, p in asked if z not in (4,) and abs(z - 4) == 2]
        assert carried
        for box in carried:
            assert bottom <= box[2] <= bottom + 3  # the box's bottom: the margin is 3 model px here


def test_lookahead_keeps_the_output_whose_next_slice_agrees(monkeypatch, enc):
    """On slice 5 output 0 is a copy of the previous mask whose box finds nothing on slice 6, output
    1 the object, which moved and goes on: most like the previous mask keeps the decoy, the
    look-ahead the object."""
    empty = np.zeros((45, 31), bool)
    here, moved = _square(8, 4, 20, 14), _square(8, 6, 20, 16)  # the object moves sideways on slice 5
    truth = {2: here, 3: here, 4: here, 5: moved, 6: moved}

    def outputs(z, p):
        if z == 6 and p.box[1] < 5:  # the decoy's box (the previous mask's, no margin)
            return [empty, empty]
        obj = truth.get(z, empty)
        return [here if z == 5 else obj, obj]

    _scripted(monkeypatch, enc, outputs)
    seed = {4: Prompt2D.from_box((8, 4, 20, 14))}
    prev = drain(propagate(enc, seed, params=dataclasses.replace(OPEN, choose="previous", margin=0.0, margin_frac=0.0)))
    ahead = drain(propagate(enc, seed, params=dataclasses.replace(OPEN, choose="lookahead", margin=0.0,
                                                                  margin_frac=0.0)))
    np.testing.assert_array_equal(prev[5], here)  # most like the previous mask: the decoy
    assert 6 not in prev
    np.testing.assert_array_equal(ahead[5], moved)
    assert set(ahead) == set(range(2, 7))


# --- an end criterion: the seed's own tissue (issue 16, fourth pass) ---------------------------

@pytest.mark.parametrize(("kw", "reason"), [
    ({"tissue": 0.01}, "seed tissue ran out"),
    ({"in_range": 0.05}, "off the seed's tissue"),
    ({"tissue": float("nan"), "in_range": float("nan")}, None),  # a seed with no tissue range: no verdict
])
def test_tissue_stop_reasons(kw, reason):
    on = PropagationParams(min_tissue=0.02, min_in_range=0.1)
    assert on.stop_reason(_score(**kw), seed_area=100) == reason
    assert PropagationParams().stop_reason(_score(**kw), seed_area=100) is None  # off by default


def test_seed_tissue_stops_a_mask_carried_past_the_structures_end(tiny_lite, monkeypatch):
    """A bright structure on slices 2..6 of a dark volume; the decoder keeps giving a mask of the
    same size on every slice (as a multimask output carried by overlap does past a structure's end):
    the run goes on to both ends of the volume without the tissue criteria, and ends at the
    structure's ends with either of them."""
    rng = np.random.default_rng(1)
    vol = (0.2 + 0.05 * rng.random((9, 45, 31))).astype(np.float32)
    for z in range(2, 7):
        vol[z, 8:20, 4:14] = 0.9 + 0.05 * rng.random((12, 10))
    enc = VolumeEncoder(tiny_lite, vol)
    _scripted(monkeypatch, enc, lambda z, p: [_square(8, 4, 20, 14)])
    seed = {4: Prompt2D.from_box((8, 4, 20, 14))}
    open_run = drain(propagate(enc, seed, params=OPEN))
    assert set(open_run) == set(range(9))
    assert open_run.scores[1].tissue == 0.0 and open_run.scores[3].tissue == pytest.approx(1.0, abs=0.15)
    for key, value, reason in (("min_tissue", 0.05, "seed tissue ran out"), ("min_in_range", 0.5, "off the seed's tissue")):
        out = drain(propagate(enc, seed, params=dataclasses.replace(OPEN, **{key: value})))
        assert set(out) == set(range(2, 7)), key
        assert {s.reason for s in out.stops} == {reason}
        assert {s.at for s in out.stops} == {1, 7}
    # the default guards do not stop this run (the mask keeps its size and place): only the tissue does
    guards = dataclasses.replace(PropagationParams(), min_iou=None, min_feature=None, max_intensity_z=None,
                                 large_seed=None)
    assert set(drain(propagate(enc, seed, params=guards))) == set(range(9))
    assert set(drain(propagate(enc, seed, params=dataclasses.replace(guards, min_tissue=0.05)))) == set(range(2, 7))


def test_a_seed_with_a_known_mask_carries_from_it_not_from_the_decoders_mask(monkeypatch, enc):
    """A person corrected the seed slice: the run starts from their mask (its box, its area as the
    reference), not from what the decoder makes of the box around it."""
    asked = _scripted(monkeypatch, enc, lambda z, p: [_square(8, 4, 30, 24)])  # the decoder: too big
    right = _square(8, 4, 20, 14)
    box = box_of(right)
    out = drain(propagate(enc, {4: Prompt2D(box=box, known=right)}, params=dataclasses.replace(OPEN, max_slices=1)))
    np.testing.assert_array_equal(out[4], right)  # the seed slice keeps the person's mask
    carried = {z: p.box for z, p in asked if z != 4}
    assert set(carried) == {3, 5}
    for b in carried.values():  # carried from the person's mask (+ the margin), not the decoder's
        assert b[2] < 25 and b[3] < 20
    assert out.scores[5].area_ratio == pytest.approx(22 * 20 / right.sum())
    plain = _scripted(monkeypatch, enc, lambda z, p: [_square(8, 4, 30, 24)])
    drain(propagate(enc, {4: Prompt2D(box=box)}, params=dataclasses.replace(OPEN, max_slices=1)))
    assert all(p.box[2] >= 30 for z, p in plain if z != 4)  # without it: the decoder's mask is carried


def test_a_known_mask_tighter_than_the_decoders_does_not_stop_the_run_on_intensity(tiny_lite, monkeypatch):
    """A person's mask has no partial-volume rim; the decoder's masks on the next slices have one.
    Their intensities are compared with the decoder's own reading of the seed, so the tight mask
    is not taken for a jump to another tissue (it was: the run wrote the seed slice only)."""
    rng = np.random.default_rng(2)
    vol = (0.2 + 0.01 * rng.random((9, 45, 31))).astype(np.float32)
    for z in range(2, 7):
        vol[z, 8:20, 4:14] = 0.5  # the rim
        vol[z, 10:18, 6:12] = 0.9 + 0.01 * rng.random((8, 6))  # the core: what the person drew
    enc = VolumeEncoder(tiny_lite, vol)
    _scripted(monkeypatch, enc, lambda z, p: [_square(8, 4, 20, 14) if 2 <= z <= 6 else np.zeros((45, 31), bool)])
    core = _square(10, 6, 18, 12)
    params = dataclasses.replace(PropagationParams(), min_iou=None, min_feature=None)  # the scripted IoU, features
    out = drain(propagate(enc, {4: Prompt2D(box=box_of(core), known=core)}, params=params))
    assert set(out) == set(range(2, 7))
    np.testing.assert_array_equal(out[4], core)


# --- the seed decides: a large seed follows the structure and stops on its tissue (issue 16, sixth pass)

def test_large_seed_params_apply_to_seeds_that_get_no_zoom_window():
    params = PropagationParams()
    big, small = Prompt2D.from_box((10, 10, 50, 40)), Prompt2D.from_box((10, 10, 22, 20))
    assert params.is_large(big, (96, 96)) and not params.is_large(small, (96, 96))  # 40 px: over a third
    assert not params.is_large(Prompt2D(), (96, 96))  # no box, no points: the fields as they are
    large = params.for_seed(True)
    assert (large.seed_choose, large.choose, large.connect, large.gate, large.min_iou, large.min_tissue) == (
        "contrast", "previous", True, 0.25, None, None)
    assert params.gate is None  # a small seed's masks are not gated
    assert (large.min_area_ratio, large.max_area_ratio, large.min_inside) == (0.15, 2.5, 0.6)  # the leak guards stay
    assert large.large_seed is None and params.for_seed(False) is params
    assert PropagationParams(large_seed=None).for_seed(True) == PropagationParams(large_seed=None)
    assert PropagationParams.legacy().for_seed(True) == PropagationParams.legacy()  # one carry, as before
    open_ = PropagationParams.permissive().for_seed(True)
    assert (open_.choose, open_.seed_choose, open_.connect, open_.min_iou, open_.min_tissue) == (
        "previous", "contrast", True, None, None)


def _structure_volume(shape, rows, cols):
    """A bright structure on slices 2..6 of a dark volume (a little noise everywhere)."""
    rng = np.random.default_rng(3)
    vol = (0.2 + 0.05 * rng.random((9, *shape))).astype(np.float32)
    vol[2:7, rows[0]:rows[1], cols[0]:cols[1]] = 0.9 + 0.05 * rng.random((5, rows[1] - rows[0], cols[1] - cols[0]))
    return vol


def _drifting_decoder(shape, obj, other, speck=None):
    """The single-mask output jumps to a neighbour on slice 5; a multimask output is the object where
    it is (with a separate ``speck`` on it), and past its ends a mask of the same size in the same
    place (on the dark background), as LiteMedSAM's multimask outputs do past a brain's end;
    predicted IoU 0.8 / 0.2."""
    empty = np.zeros(shape, bool)
    speck = empty if speck is None else speck

    def outputs(z, p):
        if 2 <= z <= 6:
            return [(other if z == 5 else obj, 0.8), (obj | speck, 0.2)]
        return [(empty, 0.1), (obj, 0.2)]
    return outputs


def test_a_large_seed_follows_the_structure_and_stops_where_its_tissue_runs_out(tiny_lite, monkeypatch):
    """Every seed on these 45 x 31 slices is large: by default its run keeps the output most like
    the previous mask (not the single-mask output, which jumps), has no absolute IoU floor (the
    multimask output's 0.2 would stop it at once), keeps only the pieces joined to the previous mask
    (the output's separate speck is not written), keeps of each mask only the seed's tissue and ends
    where that gated mask vanishes, not at the volume's ends (without the gate, the same-size mask
    on the background runs to the volume's ends unless the seed-tissue floor is set). With one carry for every seed (``large_seed=None``, the earlier default) the
    run stops at the jump."""
    obj, other, speck = _square(8, 4, 20, 14), _square(26, 18, 38, 28), _square(40, 25, 43, 28)
    enc = VolumeEncoder(tiny_lite, _structure_volume((45, 31), (8, 20), (4, 14)))
    _scripted(monkeypatch, enc, _drifting_decoder((45, 31), obj, other, speck))
    seed = {4: Prompt2D.from_box((8, 4, 20, 14))}
    out = drain(propagate(enc, seed))  # the default
    assert out.large == (4,)
    assert set(out) == set(range(2, 7))
    for z in out:  # the object (the tissue gate may drop a noise pixel at its range's edge), not the speck
        assert not (out[z] & ~obj).any() and out[z].sum() >= 0.97 * obj.sum()
    assert {s.at for s in out.stops} == {1, 7}  # here the intensity jump says it first
    assert out.scores[5].output == 1  # the multimask output where the single-mask one jumped
    tissue = drain(propagate(enc, seed, params=PropagationParams(max_intensity_z=None)))
    # past the ends the gated mask is empty (no seed tissue is left in it)
    assert set(tissue) == set(range(2, 7)) and {s.reason for s in tissue.stops} == {"vanished"}
    no_gate = tuple((k, v) for k, v in LARGE_SEED if k != "gate")
    ungated = drain(propagate(enc, seed, params=PropagationParams(max_intensity_z=None, large_seed=no_gate)))
    assert set(ungated) == set(range(9))  # the same-size mask on the background, to the volume's ends
    floor = PropagationParams(max_intensity_z=None, large_seed=(*no_gate, ("min_tissue", 0.02)))
    tissue = drain(propagate(enc, seed, params=floor))  # the sixth pass's large-seed stop
    assert set(tissue) == set(range(2, 7)) and {s.reason for s in tissue.stops} == {"seed tissue ran out"}
    one = drain(propagate(enc, seed, params=PropagationParams(large_seed=None)))
    assert one.large == () and set(one) == {2, 3, 4}  # the single-mask output jumped on slice 5


def test_a_small_seed_keeps_the_fields_as_they_are(tiny_lite, monkeypatch):
    """The same structure on 96 x 96 slices, its box small enough for a zoom window: the run uses
    the fields as they are (the single-mask output, the IoU floor), not the large-seed carry."""
    def square(r0, c0, r1, c1):
        m = np.zeros((96, 96), bool)
        m[r0:r1, c0:c1] = True
        return m

    obj, other = square(40, 40, 52, 50), square(70, 70, 82, 80)
    enc = VolumeEncoder(tiny_lite, _structure_volume((96, 96), (40, 52), (40, 50)))
    _scripted(monkeypatch, enc, _drifting_decoder((96, 96), obj, other))
    out = drain(propagate(enc, {4: Prompt2D.from_box((40, 40, 52, 50))}))
    assert out.large == ()
    assert set(out) == {2, 3, 4}  # the single-mask output jumped to the neighbour on slice 5
    assert {(s.direction, s.at, s.reason) for s in out.stops} == {(-1, 1, "vanished"), (1, 5, "jumped")}


# --- the mask gated by the seed's tissue (issue 16, seventh pass)

def _leaking_volume():
    """A bright structure on slices 2..6 (rows 8..19) with a mid-grey neighbour touching it below
    (rows 20..29) on every slice, on a dark background."""
    rng = np.random.default_rng(4)
    vol = (0.2 + 0.02 * rng.random((9, 45, 31))).astype(np.float32)
    vol[:, 20:30, 4:14] = 0.55 + 0.02 * rng.random((9, 10, 10))
    vol[2:7, 8:20, 4:14] = 0.9 + 0.02 * rng.random((5, 12, 10))
    return vol


def test_gate_keeps_the_seeds_tissue_and_ends_where_it_runs_out(tiny_lite, monkeypatch):
    """On the seed slice the decoder's mask is the structure and a few background pixels; on every
    other slice it leaks onto the touching neighbour (one piece with the structure, so ``connect``
    keeps it) and past the structure's ends it stays there. Without the gate the run writes the
    neighbour on every slice of the volume; gated by the seed's tissue the seed slice loses its
    background pixels, every slice keeps exactly the structure and the run ends at both of its ends."""
    obj = _square(8, 4, 20, 14)
    seed_mask = obj.copy()
    seed_mask[20, 4:9] = True  # 5 of 125 pixels on the dark background (within the 5 % tail)
    leak = _square(8, 4, 30, 14)
    enc = VolumeEncoder(tiny_lite, _leaking_volume())
    _scripted(monkeypatch, enc, lambda z, p: [seed_mask if z == 4 else leak])
    seed = {4: Prompt2D.from_box((8, 4, 20, 14))}
    plain = drain(propagate(enc, seed, params=dataclasses.replace(OPEN, connect=True)))
    assert set(plain) == set(range(9))  # carried onto the neighbour to both ends of the volume
    assert plain[4].sum() == 125 and plain[3].sum() == leak.sum()
    gated = drain(propagate(enc, seed, params=dataclasses.replace(OPEN, connect=True, gate=0.1)))
    assert set(gated) == set(range(2, 7))
    for z in gated:
        np.testing.assert_array_equal(gated[z], obj)
    assert {(s.at, s.reason) for s in gated.stops} == {(1, "vanished"), (7, "vanished")}
    assert gated.scores[4].area == obj.sum()


def test_gate_follow_tracks_a_slow_drift_of_the_structures_intensity(tiny_lite, monkeypatch):
    """The structure darkens slice by slice (a bias field) while its neighbour stays: a fixed gate
    loses the structure a few slices from the seed, the gate that follows the gated masks' median
    keeps it on every slice."""
    rng = np.random.default_rng(5)
    vol = (0.1 + 0.01 * rng.random((9, 45, 31))).astype(np.float32)
    for z in range(9):
        vol[z, 8:20, 4:14] = 0.9 - 0.015 * abs(z - 4) + 0.05 * rng.random((12, 10))
    enc = VolumeEncoder(tiny_lite, vol)
    obj = _square(8, 4, 20, 14)
    _scripted(monkeypatch, enc, lambda z, p: [obj])
    seed = {4: Prompt2D.from_box((8, 4, 20, 14))}
    fixed = drain(propagate(enc, seed, params=dataclasses.replace(OPEN, connect=True, gate=0.1)))
    follow = drain(propagate(enc, seed, params=dataclasses.replace(OPEN, connect=True, gate=0.1, gate_follow=True)))
    assert not {0, 8} & set(fixed)  # 4 slices from the seed the structure is darker than the seed's range
    assert set(follow) == set(range(9))
    for z in follow:  # it lags (the median of a gated mask leans to the range's side) but keeps more
        assert not (follow[z] & ~obj).any()
        assert follow[z].sum() >= (fixed[z].sum() if z in fixed else 1)
    assert follow[0].sum() + follow[8].sum() >= 0.25 * obj.sum()


def test_gated_closing_stays_within_the_mask():
    from napari_medsam.core.propagation import _gated

    img = np.full((12, 12), 200.0)
    img[5, 5] = 10.0  # a dark pixel inside the structure (noise)
    mask = np.zeros((12, 12), bool)
    mask[2:9, 2:9] = True
    assert not _gated(mask, img, (150, 250), 0)[5, 5]
    closed = _gated(mask, img, (150, 250), 1)
    np.testing.assert_array_equal(closed, mask)  # the hole closed, nothing outside the mask added
    assert not _gated(mask, img, (0, 100), 1).any() or _gated(mask, img, (0, 100), 1).sum() == 1


def test_a_large_seed_is_gated_by_its_tissue(tiny_lite, monkeypatch):
    """Every seed on these 45 x 31 slices is large: by default its masks keep only the seed's
    tissue, so the decoder's leak onto the touching neighbour (and the seed's few background pixels)
    is not written and the run ends at the structure's ends; without the gate in the large-seed
    carry the leak is written or the run stops at it."""
    obj = _square(8, 4, 20, 14)
    seed_mask = obj.copy()
    seed_mask[20, 4:9] = True
    leak = _square(8, 4, 30, 14)
    enc = VolumeEncoder(tiny_lite, _leaking_volume())
    _scripted(monkeypatch, enc, lambda z, p: [seed_mask if z == 4 else leak])
    seed = {4: Prompt2D.from_box((8, 4, 20, 14))}
    out = drain(propagate(enc, seed))  # the default
    assert out.large == (4,)
    assert set(out) == set(range(2, 7))
    for z in out:
        np.testing.assert_array_equal(out[z], obj)
    ungated = PropagationParams(large_seed=tuple((k, v) for k, v in LARGE_SEED if k != "gate"))
    plain = drain(propagate(enc, seed, params=ungated))
    assert set(plain) != set(range(2, 7)) or any((plain[z] != obj).any() for z in plain)
