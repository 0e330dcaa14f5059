"""The Annotate dock: propagated slices are proposals; a brush stroke reviews a slice; propagating
again replaces the old proposals, never a committed or painted slice."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.app.bookkeeping import volume_view

from .conftest import wait_job

pytestmark = pytest.mark.gui


def _square(r0, r1):
    m = np.zeros((32, 30), bool)
    m[r0:r1, 3:25] = True
    return m


def _volume_in_the_dock(viewer, widgets):
    """A 12-slice random volume and its labels layer, chosen in the Annotate dock."""
    annot = widgets.annot
    image = viewer.add_image(np.random.default_rng(0).random((12, 32, 30)).astype(np.float32), name="vol")
    annot.image_combo.set_layer(image)
    labels = viewer.add_labels(np.zeros((12, 32, 30), np.uint8), name="vol labels")
    annot.labels_combo.set_layer(labels)
    return annot, labels


def _record_spans(annot):
    """Replace the session's propagation with one that records the span it was asked for."""
    spans = []

    def fixed(req, seeds, params=None, *, cancel=None, span=None):
        spans.append(span)
        yield from ()
        return {}

    annot.session.propagate_steps = fixed
    return spans


def test_repropagating_in_the_dock_replaces_only_unreviewed_proposals(viewer, widgets, qtbot):
    annot, labels = _volume_in_the_dock(viewer, widgets)
    assert annot.labels_layer is labels
    plans, seen = [], []

    def fixed(req, seeds, params=None, *, cancel=None, span=None):  # the tiny model's masks are noise
        seen.append(sorted(seeds))
        yield from ()
        return plans.pop(0)

    annot.session.propagate_steps = fixed
    a, b = _square(2, 12), _square(16, 30)
    view = volume_view(labels.data.shape, 0, 3)
    annot.session.commit(3, a, 1, target=labels, view=view)
    plans.append(dict.fromkeys(range(2, 8), a))
    annot.propagate()
    wait_job(qtbot, annot.propagate_job)
    assert seen[-1] == [3] and annot.session.edits.proposed(labels, 1, 0) == {2, 4, 5, 6, 7}
    assert "proposals" in annot.status_label.text()
    # a brush stroke on proposal slice 5 (through the layer: a paint event) reviews it
    idx = (np.full(4, 5), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))
    labels.data_setitem(idx, 1)
    assert annot.session.edits.proposed(labels, 1, 0) == {2, 4, 6, 7}
    annot.session.commit(9, b, 1, target=labels, view=view)
    plans.append({3: a, 5: a, 9: b, **dict.fromkeys((6, 7, 8, 10), b)})
    annot.propagate()
    wait_job(qtbot, annot.propagate_job)
    assert seen[-1] == [3, 5, 9]
    data = labels.data
    assert not (data[[2, 4]] == 1).any()  # only propagated before: replaced (here by nothing)
    np.testing.assert_array_equal(data[3] == 1, a)
    assert (data[5, :2, :2] == 1).all() and np.array_equal(data[5, 2:] == 1, a[2:])  # painted: kept
    for z in (6, 7, 8, 10):
        np.testing.assert_array_equal(data[z] == 1, b)
    # the propagation's own writes went through the layer too, and did not count as the user's
    assert annot.session.edits.proposed(labels, 1, 0) == {6, 7, 8, 10}


def test_propagate_within_a_typed_slice_range(viewer, widgets, qtbot):
    annot, labels = _volume_in_the_dock(viewer, widgets)
    spans = _record_spans(annot)
    annot.session.commit(3, _square(2, 12), 1, target=labels, view=volume_view(labels.data.shape, 0, 3))
    annot.range_edit.setText("2:abc")
    annot.propagate()
    assert annot.propagate_job is None and spans == []  # refused with a hint, nothing started
    assert "START:STOP" in annot.hint_label.text()
    annot.range_edit.setText("2:6")
    annot.propagate()
    wait_job(qtbot, annot.propagate_job)
    assert spans == [(2, 7)]  # both ends included, as the user reads slice numbers
    annot.range_edit.setText("")
    annot.propagate()
    wait_job(qtbot, annot.propagate_job)
    assert spans[-1] is None  # empty: every slice


def test_range_ends_from_the_slice_in_view(viewer, widgets, qtbot):
    annot, labels = _volume_in_the_dock(viewer, widgets)
    spans = _record_spans(annot)
    annot.session.commit(5, _square(2, 12), 1, target=labels, view=volume_view(labels.data.shape, 0, 5))

    def go_to(z):
        viewer.dims.current_step = (z, *viewer.dims.current_step[1:])

    go_to(8)
    annot.range_to_button.click()
    assert annot.range_edit.text() == ":8"
    go_to(2)
    annot.range_from_button.click()
    assert annot.range_edit.text() == "2:8"
    go_to(10)
    annot.range_from_button.click()  # past the end: the two ends swap
    assert annot.range_edit.text() == "8:10"
    annot.propagate()
    wait_job(qtbot, annot.propagate_job)
    assert spans == [(8, 11)]
