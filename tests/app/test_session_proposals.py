"""Propagated slices are proposals until reviewed; a new propagation replaces the old proposals only."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.app.loop import ReviewLoop
from napari_medsam.app.session import AnnotationSession
from napari_medsam.core.propagation import PropagationParams


def _square(r0: int, r1: int) -> np.ndarray:
    m = np.zeros((32, 32), bool)
    m[r0:r1, 4:20] = True
    return m


A, B = _square(2, 12), _square(14, 28)  # what propagations from seed A and from seed B write


@pytest.fixture
def session():
    """A session on a 10-slice image with its own labels; propagation is faked with fixed masks
    (a tiny random model's masks are noise): each call returns the next planned result."""
    s = AnnotationSession(disk_cache=False)
    s.open_image(np.zeros((10, 32, 32), np.float32), axis=0)
    s.plans, s.seen = [], []
    s.events = []
    s.labels_changed.connect(lambda axis, slices: s.events.append(("labels", slices)))
    s.proposals_changed.connect(lambda axis, slices: s.events.append(("proposals", slices)))

    def fake(req, seeds, params=None, *, cancel=None, span=None):
        s.seen.append(sorted(seeds))
        yield from ()
        return s.plans.pop(0)

    s.propagate_steps = fake
    return s


def test_a_second_propagation_replaces_only_unreviewed_proposals(session):
    s = session
    lab = s.labels.data
    s.commit(3, A, 1)  # seed A, reviewed
    s.plans.append(dict.fromkeys(range(2, 8), A))
    s.propagate(1)
    assert s.seen[-1] == [3]
    assert s.edits.proposed(s.labels, 1, 0) == {2, 4, 5, 6, 7} and s.edits.committed(s.labels, 1, 0) == {3}
    assert s.events[-1] == ("proposals", (2, 4, 5, 6, 7))  # not labels_changed: the loop must not train on them
    # the user paints on proposal slice 5 (a reviewed slice now) and draws class 2 on proposal slice 4
    lab[5, 0, 0] = 1
    s.mark_reviewed(None, 0, [5])
    lab[4, 30, 30] = 2
    s.commit(8, B, 1)  # seed B
    s.plans.append({**dict.fromkeys(range(6, 10), B), 3: A, 5: A, 8: B})
    s.propagate(1)
    assert s.seen[-1] == [3, 5, 8]  # reviewed slices seed it; proposals do not
    for z in (2, 4):  # propagated before only: erased (the other class stays)
        assert not (lab[z] == 1).any()
    assert lab[4, 30, 30] == 2
    np.testing.assert_array_equal(lab[5] == 1, A | (np.arange(32)[:, None] == 0) & (np.arange(32) == 0))  # painted: kept
    np.testing.assert_array_equal(lab[3] == 1, A)  # committed: kept
    np.testing.assert_array_equal(lab[8] == 1, B)
    for z in (6, 7, 9):  # the new run's proposals
        np.testing.assert_array_equal(lab[z] == 1, B)
    assert s.edits.proposed(s.labels, 1, 0) == {6, 7, 9}
    # undo brings the first propagation's proposals back, and its bookkeeping
    s.undo()
    for z in (2, 4, 6, 7):
        np.testing.assert_array_equal(lab[z] == 1, A)
    assert not lab[9].any() and s.edits.proposed(s.labels, 1, 0) == {2, 4, 6, 7}


def test_the_review_loops_reviewed_slices_are_kept(session):
    s = session
    s.commit(3, A, 1)
    s.plans.append(dict.fromkeys(range(2, 8), A))
    s.propagate(1)
    s.loop = ReviewLoop(s.labels.data, axis=0)
    s.loop.mark_reviewed([6])  # accepted in the Review dock: reviewed, one notion
    s.plans.append({3: A, **dict.fromkeys((4, 5, 6, 7), B)})
    s.propagate(1)
    lab = s.labels.data
    np.testing.assert_array_equal(lab[6] == 1, A)
    np.testing.assert_array_equal(lab[5] == 1, B)
    assert not (lab[2] == 1).any()


def test_a_real_propagation_names_its_seeds_and_writes_proposals(tmp_path):
    from napari_medsam.app.params import ModelChoice

    vol = np.zeros((7, 40, 40), np.float32)
    for z in range(7):
        vol[z, 10 + z:26 + z, 8:24] = 200.0
    s = AnnotationSession(cache_dir=tmp_path / "emb", disk_cache=False)
    s.load_model(ModelChoice("test_tiny_lite", device="cpu"))
    s.open_image(vol, axis=0)
    seed = np.zeros((40, 40), bool)
    seed[13:29, 8:24] = True
    s.commit(3, seed, 1)
    out = s.propagate(1, params=PropagationParams.permissive(), span=(2, 6))
    assert out.seeds == (3,) and set(out) <= {2, 3, 4, 5}
    assert s.edits.proposed(s.labels, 1, 0) == set(out.proposals)
    assert not s.labels.data[[0, 1, 6]].any()  # outside the range: untouched
    np.testing.assert_array_equal(s.labels.data[3] == 1, seed)  # the committed slice is kept as it is
