"""The one adapter from core progress generators to napari thread workers.

:func:`start` runs a generator that yields :class:`~napari_medsam.core.progress.Progress` and
``return``s a result in a napari ``GeneratorWorker`` and gives back a :class:`Job`. On the main
thread it drives a napari progress bar (with a Cancel button in the activity panel), calls the
widget's callbacks, and shows errors: a :class:`~napari_medsam.core.errors.MedSamError` as a
warning notification with its actionable message, a cancellation as an info message, anything
else as napari's error notification with the traceback.

Cancelling sets the ``threading.Event`` the generator received (core loops check it between
steps) and asks the worker to quit at its next ``yield``.

napari's own progress bar (``show_bar=True``) is off by default: while any napari progress bar
exists, napari plays an animated "loading" GIF in its status bar, and under software OpenGL
(Mesa llvmpipe: Xvfb, remote desktops, VMs) every frame of it re-composites the window on the main
thread: ``benchmarks/bench_gui.py`` measured the main thread blocked ~40 ms of every 50 and the
worker 6x slower. The widgets show progress and Cancel in their own determinate bars instead, and
offer napari's activity bar as an option (``Session.napari_progress``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from napari.qt.threading import GeneratorWorker
from napari.utils.notifications import show_error, show_info, show_warning
from napari.utils.progress import cancelable_progress, progress
from qtpy.QtCore import QThreadPool

from ..core._exit import run_at_exit
from ..core.errors import Cancelled, MedSamError
from ..core.progress import Progress

BAR_INTERVAL = 0.1  # seconds between two updates of the napari progress bar
MIN_POOL_THREADS = 4  # embedding + propagation + previews at once, without previews queueing
EXIT_WAIT_MS = 30_000  # at interpreter exit: how long running jobs get to reach their next step

_LIVE: set[Job] = set()


def _stop_jobs_at_exit() -> None:
    """Cancel every running job and wait for the pool (at most :data:`EXIT_WAIT_MS`).

    A worker still inside torch when the interpreter finalises aborts the process ("terminate
    called without an active exception"): closing napari while a job runs must not end like that.
    Registered to run before the thread pools shut down (:func:`napari_medsam.core._exit.run_at_exit`).
    """
    for job in list(_LIVE):
        job.cancelled = True
        job.cancel_event.set()
    if _LIVE:
        QThreadPool.globalInstance().waitForDone(EXIT_WAIT_MS)


class JobError(Exception):
    """An unexpected error in a worker, re-raised with its original as ``__cause__``.

    superqt treats a ``RuntimeError`` leaving a generator as "the worker was deleted" and drops it;
    wrapping keeps such errors (e.g. torch's) visible.
    """


class _CancelableBar(cancelable_progress):
    """A napari progress bar whose activity-panel Cancel button cancels the job at once."""

    def cancel(self) -> None:
        super().cancel()
        if self.cancel_callback is not None:
            self.cancel_callback()


class _Worker(GeneratorWorker):
    """napari's GeneratorWorker whose errors this module reports itself."""

    def _relay_error(self, exc: Exception) -> None:  # replaces napari's default relay
        pass


def _guard(gen: Generator[Progress, Any, Any]) -> Generator[Progress, Any, Any]:
    try:
        return (yield from gen)
    except (MedSamError, JobError):
        raise
    except RuntimeError as e:
        raise JobError(f"{type(e).__name__}: {e}") from e
    finally:
        gen.close()


class Job:
    """A generator running in a napari thread worker, with its progress bar and cancel event."""

    def __init__(self, worker: Any, cancel_event: threading.Event, bar: Any, desc: str) -> None:
        self.worker = worker
        self.cancel_event = cancel_event
        self.bar = bar
        self.desc = desc
        self.done = False
        self.cancelled = False
        self.last: Progress | None = None
        self.returned = False
        self.bar_time = 0.0
        self._done_callbacks: list[Callable[[Job], None]] = []

    @property
    def running(self) -> bool:
        return not self.done

    def cancel(self) -> None:
        """Ask the work to stop between two steps (nothing half-written is kept)."""
        if self.done:
            return
        self.cancelled = True
        self.cancel_event.set()
        self.worker.quit()

    def add_done_callback(self, fn: Callable[[Job], None]) -> None:
        """Call ``fn(job)`` on the main thread when the job finishes (at once if it has), after
        ``on_finished``."""
        if self.done:
            fn(self)
        else:
            self._done_callbacks.append(fn)

    def __repr__(self) -> str:
        state = "done" if self.done else ("cancelling" if self.cancelled else "running")
        return f"Job({self.desc!r}, {state})"


def any_running() -> bool:
    """Whether a job started by :func:`start` is still running."""
    return any(not job.done for job in list(_LIVE))


def start(
    make_gen: Callable[[threading.Event], Generator[Progress, Any, Any]],
    *,
    desc: str,
    on_progress: Callable[[Progress], None] | None = None,
    on_returned: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finished: Callable[[Job], None] | None = None,
    show_bar: bool = False,
    cancelable: bool = True,
    notify_errors: bool = True,
) -> Job:
    """Run ``make_gen(cancel_event)`` in a thread worker; return its :class:`Job` (already started).

    Callbacks run on the main thread: ``on_progress(Progress)`` per step, ``on_returned(result)``
    when it completes (not when cancelled), ``on_error(exception)`` on failure and
    ``on_finished(job)`` always, last.
    """
    cancel_event = threading.Event()
    gen = make_gen(cancel_event)
    worker = _Worker(_guard, gen)
    bar = None
    if show_bar:
        bar = _CancelableBar(total=0, desc=desc) if cancelable else progress(total=0, desc=desc)
    job = Job(worker, cancel_event, bar, desc)
    if bar is not None and cancelable:
        bar.cancel_callback = job.cancel

    def _yielded(p: Any) -> None:
        # napari's progress bar calls QApplication.processEvents() on every update, so this may run
        # re-entrantly: late steps after the result arrived are dropped, and the bar is updated at
        # most every BAR_INTERVAL seconds, after the widget's callback.
        if not isinstance(p, Progress) or job.returned or job.done:
            return
        job.last = p
        if on_progress is not None:
            on_progress(p)
        if bar is None or job.done or job.returned:
            return
        now = time.perf_counter()
        final = bool(p.total) and p.step >= p.total
        if now - job.bar_time < BAR_INTERVAL and not final:
            return
        job.bar_time = now
        if p.total and bar.total != p.total:
            bar.total = p.total
        text = f"{desc}: {p.message}" if p.message and p.message != desc else desc
        if text != bar.desc:
            bar.set_description(text)
        if p.step != bar.n:
            bar.update(p.step - bar.n)

    def _returned(result: Any) -> None:
        job.returned = True
        if on_returned is not None and not job.cancelled:
            on_returned(result)

    def _errored(exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            job.cancelled = True
            if notify_errors:
                show_info(str(exc))
        elif notify_errors:
            if isinstance(exc, MedSamError):
                show_warning(f"{desc}: {exc}")
            else:
                cause = exc.__cause__ or exc
                show_error(f"{desc} failed: {type(cause).__name__}: {cause}")
        if on_error is not None:
            on_error(exc)

    def _finished() -> None:
        job.done = True
        _LIVE.discard(job)
        if bar is not None:
            bar.close()
        if on_finished is not None:
            on_finished(job)
        callbacks, job._done_callbacks = job._done_callbacks, []
        for fn in callbacks:
            fn(job)

    worker.yielded.connect(_yielded)
    worker.returned.connect(_returned)
    worker.errored.connect(_errored)
    worker.finished.connect(_finished)
    pool = QThreadPool.globalInstance()
    if pool.maxThreadCount() < MIN_POOL_THREADS:
        pool.setMaxThreadCount(MIN_POOL_THREADS)
    run_at_exit(_stop_jobs_at_exit)
    _LIVE.add(job)
    worker.start()
    return job


def show_progress(bar: Any, p: Progress | None = None) -> None:
    """Show a widget's QProgressBar determinate (0 of 1 until the total is known): an indeterminate
    bar animates continuously, which costs the main thread under software OpenGL."""
    bar.setVisible(True)
    if p is None or not p.total:
        if bar.maximum() == 0 or p is None:
            bar.setRange(0, 1)
            bar.setValue(0)
        return
    if bar.maximum() != p.total:
        bar.setRange(0, p.total)
    bar.setValue(min(p.step, p.total))


def wait(job: Job | None, timeout_ms: int = 60_000) -> None:
    """Process Qt events until ``job`` is done (scripts and tests; never from a callback)."""
    from qtpy.QtWidgets import QApplication

    if job is None:
        return
    deadline = time.perf_counter() + timeout_ms / 1000
    while not job.done:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{job!r} did not finish within {timeout_ms} ms")
        QApplication.processEvents()
        time.sleep(0.002)
