"""The collector settle (``_qt._gc``): what is alive is frozen out of later collections, garbage
from before is collected (frozen objects too), and a layer removal schedules one settle."""

from __future__ import annotations

import gc
import weakref

import pytest

from napari_medsam._qt import _gc

pytestmark = pytest.mark.gui


class _Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _unfrozen():
    yield
    gc.unfreeze()


def test_settle_freezes_what_is_alive_and_collects_cycles_even_frozen_ones():
    kept = _Node()
    garbage = _Node()
    dead = weakref.ref(garbage)
    del garbage
    _gc.settle()
    assert dead() is None  # collected before the freeze
    assert gc.get_freeze_count() > 0
    assert kept not in gc.get_objects()  # frozen: later collections do not scan it
    frozen_then_dropped = weakref.ref(kept)
    del kept  # garbage now, but frozen: only a settle (which unfreezes first) can free it
    gc.collect()
    assert frozen_then_dropped() is not None
    _gc.settle()
    assert frozen_then_dropped() is None


def test_a_layer_removal_schedules_one_settle(make_napari_viewer, qtbot, monkeypatch):
    import numpy as np

    from napari_medsam._qt.session import session_for

    calls = []
    monkeypatch.setattr(_gc, "settle", lambda: calls.append(1))
    monkeypatch.setattr(_gc, "LATER_S", 0.05)
    viewer = make_napari_viewer()
    session_for(viewer)  # the first dock's set-up connects the removal
    for name in ("a", "b"):
        viewer.add_labels(np.zeros((4, 4), np.uint8), name=name)
    viewer.layers.remove("a")
    viewer.layers.remove("b")  # a burst shares one settle
    qtbot.waitUntil(lambda: bool(calls), timeout=2000)
    qtbot.wait(100)
    assert calls == [1]


def test_a_pending_settle_waits_for_a_pause_in_the_work(qtbot, monkeypatch):
    """A settle pauses the GUI thread 0.3-0.5 s: never while a job runs or the user is prompting.
    The idle clock is a fake one, so the order of events, not the test machine's speed, decides."""
    from napari_medsam._qt import _workers

    calls = []
    now = [100.0]
    monkeypatch.setattr(_gc, "settle", lambda: calls.append(1))
    monkeypatch.setattr(_gc, "_clock", lambda: now[0])
    monkeypatch.setattr(_gc, "LATER_S", 0.05)
    monkeypatch.setattr(_gc, "IDLE_S", 0.05)  # also the re-check interval, in real time

    def work(cancel):
        while not cancel.is_set():
            yield None
            cancel.wait(0.01)

    job = _workers.start(work, desc="busy")
    try:
        _gc.settle_later()
        qtbot.wait(400)
        assert calls == []  # a job is running
        _gc.note_activity()  # the user prompts while the job still runs
    finally:
        job.cancel()
        qtbot.waitUntil(lambda: job.done, timeout=5000)
    qtbot.wait(400)
    assert calls == []  # no job, but the user did something 0 s ago (on the idle clock)
    now[0] += 0.06  # ... and now longer ago than IDLE_S
    qtbot.waitUntil(lambda: bool(calls), timeout=3000)
    qtbot.wait(200)
    assert calls == [1]


def test_loading_a_model_in_a_dock_settles(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, model_w = viewer.window.add_plugin_dock_widget("napari-medsam", "Model")
    gc.unfreeze()
    model_w.select_model("test_tiny_lite")
    model_w.load()
    qtbot.waitUntil(lambda: model_w.load_job.done, timeout=120_000)
    assert model_w.session.loaded is not None
    assert gc.get_freeze_count() > 0
    assert _gc.last_settle_s is not None
