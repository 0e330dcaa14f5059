"""The session's bookkeeping: prompt signatures, label edits, the edit log, propagation seeds (no viewer)."""

from __future__ import annotations

import numpy as np

from napari_medsam.app.bookkeeping import (
    ArrayLabels,
    EditLog,
    paint_masks,
    prompt_signature,
    seeds_from_labels,
    undo_edit,
    volume_view,
)
from napari_medsam.core.segment import Prompt2D


def _view(z: int, n: int = 6):
    return volume_view((n, 20, 20), 0, z)


def _square(r0: int, r1: int, shape=(20, 20)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0:r1, r0:r1] = True
    return m


def test_volume_view_names_the_slice_axes():
    v = volume_view((5, 6, 7), 1, 3)
    assert (v.axis, v.index, v.is_3d, v.rc_axes, v.n_slices) == (1, 3, True, (0, 2), 6)
    assert v.region(3) == (slice(None), 3, slice(None))
    flat = volume_view((6, 7))
    assert not flat.is_3d and flat.region(2) == (slice(None), slice(None))


def test_prompt_signature_changes_with_the_prompt():
    a = Prompt2D.from_box((1, 2, 10, 12))
    assert prompt_signature(None) == b""
    assert prompt_signature(a) == prompt_signature(Prompt2D.from_box((1, 2, 10, 12)))
    assert prompt_signature(a) != prompt_signature(Prompt2D.from_box((1, 2, 10, 13)))
    pts = Prompt2D.from_points([(3, 4)], [1])
    assert prompt_signature(pts) != prompt_signature(Prompt2D.from_points([(3, 4)], [0]))


def test_paint_writes_only_where_the_labels_are_zero_and_undo_puts_them_back():
    labels = ArrayLabels(np.zeros((6, 20, 20), np.uint8))
    labels.data[2, 5, 5] = 7  # another class: never overwritten
    edit = paint_masks(labels, _view(2), {2: _square(2, 8)}, 1)
    assert edit is not None and edit.n_voxels == 36 - 1 and edit.slices == (2,) and edit.axis == 0
    assert labels.data[2, 5, 5] == 7 and int((labels.data == 1).sum()) == 35
    assert paint_masks(labels, _view(2), {2: _square(2, 8)}, 1) is None  # nothing new to write
    labels.data[2, 3, 3] = 4  # repainted by the user since: stays
    undo_edit(labels, edit)
    assert labels.data[2, 3, 3] == 4 and labels.data[2, 5, 5] == 7 and not (labels.data == 1).any()


def test_edit_log_undoes_newest_first_and_forgets_committed_slices():
    labels = ArrayLabels(np.zeros((6, 20, 20), np.uint8))
    log = EditLog()
    e1 = paint_masks(labels, _view(2), {2: _square(2, 8)}, 1)
    log.record(labels, 1, 0, [2], e1)
    e2 = paint_masks(labels, _view(2), {3: _square(4, 9), 4: _square(4, 9)}, 1)
    log.record(labels, 1, 0, [2, 3, 4], e2)
    log.record(labels, 1, 0, [5], None)  # committed, nothing written: not on the undo stack
    assert len(log) == 2 and log.last is e2
    assert log.committed(labels, 1, 0) == {2, 3, 4, 5} and log.committed(labels, 2, 0) == set()
    assert log.undo() == (labels, e2)
    assert not labels.data[3:5].any() and labels.data[2].any()
    assert log.committed(labels, 1, 0) == {2, 5}
    assert log.undo(lambda t: False) is None  # its target is no longer usable: skipped
    assert len(log) == 0 and labels.data[2].any()


def test_edit_log_forgets_a_removed_target():
    a, b = ArrayLabels(np.zeros((6, 20, 20), np.uint8)), ArrayLabels(np.zeros((6, 20, 20), np.uint8))
    log = EditLog()
    log.record(a, 1, 0, [1], paint_masks(a, _view(1), {1: _square(1, 5)}, 1))
    log.record(b, 1, 0, [1], paint_masks(b, _view(1), {1: _square(1, 5)}, 1))
    log.forget(b)
    assert len(log) == 1 and log.committed(b, 1, 0) == set() and log.committed(a, 1, 0) == {1}
    target, edit = log.undo()
    assert target is a and edit.slices == (1,) and not a.data.any() and b.data.any()


def test_seeds_come_from_prompts_then_committed_slices_then_the_slice_under_view():
    labels = ArrayLabels(np.zeros((6, 20, 20), np.uint8))
    view = _view(2)
    assert seeds_from_labels({}, labels, view, 1, ()) == ({}, set())
    assert seeds_from_labels({}, None, view, 1, ()) == ({}, set())

    labels.data[2, 5:10, 6:12] = 1  # the class on the slice under view, nothing committed
    seeds, kept = seeds_from_labels({}, labels, view, 1, ())
    assert list(seeds) == [2] and kept == {2}
    np.testing.assert_allclose(seeds[2].box, (5, 6, 10, 12))
    np.testing.assert_array_equal(seeds[2].known, labels.data[2] == 1)  # the run carries from the person's mask

    labels.data[4, 3:7, 3:7] = 1
    box = Prompt2D.from_box((2, 2, 9, 9))
    seeds, kept = seeds_from_labels({1: box}, labels, view, 1, [4, 5])
    assert sorted(seeds) == [1, 4] and kept == {4}  # slice 5 holds no class-1 voxels: not a seed
    assert seeds[1] is box
    np.testing.assert_allclose(seeds[4].box, (3, 3, 7, 7))
    np.testing.assert_array_equal(seeds[4].known, labels.data[4] == 1)
    seeds, _ = seeds_from_labels({4: box}, labels, view, 1, [4])
    assert seeds[4] is box  # the user's prompt wins on its slice
