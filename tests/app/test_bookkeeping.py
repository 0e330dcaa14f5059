"""The Annotate widget's bookkeeping: prompt signatures, the edit log, propagation seeds (no viewer)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam import _layers
from napari_medsam._qt._bookkeeping import EditLog, prompt_signature, propagation_seeds
from napari_medsam.core.segment import Prompt2D

pytestmark = pytest.mark.gui  # napari layers


def _view(z: int, n: int = 6) -> _layers.SliceView:
    return _layers.SliceView(axis=0, index=z, is_3d=True, rc_axes=(1, 2), n_slices=n)


def _square(r0: int, r1: int, shape=(20, 20)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0:r1, r0:r1] = True
    return m


def test_prompt_signature_changes_with_the_prompt():
    a = Prompt2D.from_box((1, 2, 10, 12))
    assert prompt_signature(None) == b""
    assert prompt_signature(a) == prompt_signature(Prompt2D.from_box((1, 2, 10, 12)))
    assert prompt_signature(a) != prompt_signature(Prompt2D.from_box((1, 2, 10, 13)))
    pts = Prompt2D.from_points([(3, 4)], [1])
    assert prompt_signature(pts) != prompt_signature(Prompt2D.from_points([(3, 4)], [0]))


def test_edit_log_undoes_newest_first_and_forgets_committed_slices():
    from napari.layers import Labels

    labels = Labels(np.zeros((6, 20, 20), np.uint8))
    log = EditLog()
    e1 = _layers.paint_masks(labels, _view(2), {2: _square(2, 8)}, 1)
    log.record(labels, 1, 0, [2], e1)
    e2 = _layers.paint_masks(labels, _view(2), {3: _square(4, 9), 4: _square(4, 9)}, 1)
    log.record(labels, 1, 0, [2, 3, 4], e2)
    log.record(labels, 1, 0, [5], None)  # committed, nothing written: not on the undo stack
    assert len(log) == 2 and log.last is e2
    assert log.committed(labels, 1, 0) == {2, 3, 4, 5} and log.committed(labels, 2, 0) == set()
    assert log.undo(lambda ly: True) is e2
    assert not labels.data[3:5].any() and labels.data[2].any()
    assert log.committed(labels, 1, 0) == {2, 5}
    assert log.undo(lambda ly: False) is None  # its layer left the viewer: skipped
    assert len(log) == 0 and labels.data[2].any()


def test_edit_log_forgets_a_removed_layer():
    from napari.layers import Labels

    a, b = Labels(np.zeros((6, 20, 20), np.uint8)), Labels(np.zeros((6, 20, 20), np.uint8))
    log = EditLog()
    log.record(a, 1, 0, [1], _layers.paint_masks(a, _view(1), {1: _square(1, 5)}, 1))
    log.record(b, 1, 0, [1], _layers.paint_masks(b, _view(1), {1: _square(1, 5)}, 1))
    log.forget(b)
    assert len(log) == 1
    assert log.undo(lambda ly: True).slices == (1,) and not a.data.any() and b.data.any()


def test_seeds_come_from_prompts_then_committed_slices_then_the_slice_under_view():
    from napari.layers import Labels, Points, Shapes

    image = Labels(np.zeros((6, 20, 20), np.uint8))  # any layer with the image's geometry will do
    labels = Labels(np.zeros((6, 20, 20), np.uint8))
    points = Points(np.zeros((0, 3)), ndim=3)
    shapes = Shapes(ndim=3)
    view = _view(2)
    assert propagation_seeds(points, shapes, image, view, labels, 1, ()) == ({}, set())

    labels.data[2, 5:10, 6:12] = 1  # the class on the slice under view, nothing committed
    seeds, kept = propagation_seeds(points, shapes, image, view, labels, 1, ())
    assert list(seeds) == [2] and kept == {2} and seeds[2].box is not None

    labels.data[4, 3:7, 3:7] = 1
    shapes.add_rectangles(np.array([[1, 2, 2], [1, 2, 9], [1, 9, 9], [1, 9, 2]], float))
    seeds, kept = propagation_seeds(points, shapes, image, view, labels, 1, [4, 5])
    assert sorted(seeds) == [1, 4] and kept == {4}  # slice 5 holds no class-1 voxels: not a seed
    np.testing.assert_allclose(seeds[4].box, (3, 3, 6, 6), atol=1)
