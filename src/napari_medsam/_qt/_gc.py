"""Python's cyclic garbage collector kept off the main thread's critical path.

With napari, Qt and torch loaded a process holds ~430,000 objects the collector tracks, and a full
(generation 2) collection scans them all while holding the GIL: 270-450 ms measured on the GUI
thread in a real window (`benchmarks/bench_gui.py`, 2-core CPU), at whatever moment the allocation
count tips it: during a box, while a layer is added, between training steps. Almost all of those
objects live as long as the process (modules, classes, the window, the model's modules).

:func:`settle` collects once and then *freezes* what is alive (``gc.freeze()``): later collections
scan only the objects created since (in a probe with napari alone, 38,000 after a settle; a full
collection of 77,000 took 66 ms, against 270-450 ms for all ~430,000 with torch loaded). It runs
where a wait is expected: when a model has finished loading. Frozen objects that later become garbage in a reference cycle (a removed layer, a replaced model) would
never be collected, so a layer removal schedules a settle for the next pause in the work
(:func:`settle_later`: no job running, no prompt for 2 s), and every settle unfreezes first:
memory stays bounded.
"""

from __future__ import annotations

import gc
import time

__all__ = ["note_activity", "settle", "settle_later"]

#: Seconds between a layer removal and the settle it schedules (removals in a burst share one).
LATER_S = 2.0
#: ... and the pause in the user's work (no job running, no prompt or slice change) it waits for.
IDLE_S = 2.0

_pending: dict[str, object] = {}
last_settle_s: float | None = None
_clock = time.perf_counter  # the idle clock (a test replaces it)


def settle() -> float:
    """Collect everything (the previously frozen objects too), then freeze what survives; returns
    the seconds it took (also kept in :data:`last_settle_s`)."""
    global last_settle_s
    t0 = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    last_settle_s = time.perf_counter() - t0
    return last_settle_s


def note_activity() -> None:
    """The user just did something (a prompt, a slice change): a pending settle waits for a pause."""
    _pending["activity"] = _clock()


def _busy() -> bool:
    from . import _workers

    recent = _clock() - float(_pending.get("activity", -1e9)) < IDLE_S  # type: ignore[arg-type]
    return recent or _workers.any_running()


def settle_later(*_args: object, delay_s: float | None = None) -> None:
    """:func:`settle` from the Qt event loop once the plugin is idle: ``delay_s`` (default
    :data:`LATER_S`) from now, then as soon as no job (propagation, training, prediction, ...) runs
    and the user has not prompted or changed slice for :data:`IDLE_S` (a settle is a 0.3-0.5 s pause
    of the GUI thread: it must not land in the middle of work). Calls while one is pending share
    it. Connect to ``viewer.layers.events.removed``."""
    from qtpy.QtCore import QTimer

    if _pending.get("timer") is not None:
        return
    timer = QTimer()
    timer.setSingleShot(True)

    def run() -> None:
        if _busy():
            timer.start(int(1000 * IDLE_S))
            return
        _pending.pop("timer", None)
        settle()

    timer.timeout.connect(run)
    _pending["timer"] = timer
    timer.start(int(1000 * (LATER_S if delay_s is None else delay_s)))
