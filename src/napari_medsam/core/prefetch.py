"""Background embedding of the slices around the one under view, so that moving to them is instant.

GUI-free: the widget tells a :class:`Prefetcher` which slice is shown (:meth:`Prefetcher.update`,
cheap, from the GUI thread); a daemon thread embeds the uncached slices nearest to it through the
:class:`~napari_medsam.core.encoder.VolumeEncoder` (and so through its cache), a few at a time,
re-reading the current slice between batches so that it follows the user. Moving to a prefetched
slice then costs a cache read plus the decoder.

:func:`prefetch_order` is the policy on its own: nearest first, more slices ahead (in the
direction of browsing) than behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from ._exit import run_at_exit
from .errors import Cancelled, MedSamError

__all__ = ["Prefetcher", "prefetch_order"]

_log = logging.getLogger(__name__)

EXIT_TIMEOUT = 30.0  # seconds the interpreter waits at exit for a prefetcher's encoder call to end
_LIVE: weakref.WeakSet[Prefetcher] = weakref.WeakSet()


def prefetch_order(center: int, n_slices: int, *, ahead: int = 8, behind: int = 4, direction: int = 1) -> list[int]:
    """Slice indices to embed around ``center``, most urgent first.

    ``direction`` (+1 or -1; 0 counts as +1) is the way the user is browsing: ``ahead`` slices on
    that side, ``behind`` on the other. Slices are ordered by distance relative to their side's
    reach (so with ``ahead=8, behind=4`` two slices ahead come per slice behind), ties ahead
    first; ``center`` itself comes first. Indices outside ``0..n_slices-1`` are dropped.
    """
    if n_slices <= 0 or not 0 <= center < n_slices:
        return []
    sign = -1 if direction < 0 else 1
    cand: list[tuple[float, int, int]] = [(0.0, 0, center)]
    for side, reach, tie in ((sign, ahead, 0), (-sign, behind, 1)):
        for d in range(1, max(0, reach) + 1):
            i = center + side * d
            if 0 <= i < n_slices:
                cand.append((d / reach, tie, i))
    return [i for _, _, i in sorted(cand)]


class Prefetcher:
    """Embeds the slices around the current one in a background thread.

    ``encoder``: a :class:`~napari_medsam.core.encoder.VolumeEncoder`; ``ahead``/``behind``: how
    far to look (see :func:`prefetch_order`); ``batch_size``: slices per encoder call (small, so
    a new :meth:`update` is followed within one call); ``on_ready(index)``: called from the
    worker thread after each slice is cached (a widget marshals it to the GUI thread itself);
    ``on_error(exc)``: called once if embedding fails (the prefetcher then stops); ``nice``: how
    much to lower the worker thread's scheduling priority (Linux; 0 keeps it): prefetching uses
    idle cycles only, so a decoder call in the foreground keeps its latency (measured on 2 busy
    cores: prompt-to-mask median 1.11x idle with nice 19, 1.3x with 10, 2.2x with 0).
    ``preempt``: while paused, the running encoder call also waits between two blocks of the
    network (and lets a foreground request of another slice use the encoder), instead of
    finishing its slice first (see :meth:`VolumeEncoder.embed
    <napari_medsam.core.encoder.VolumeEncoder.embed>`'s ``yield_to``); False: the old behaviour.

    Usage::

        pf = Prefetcher(encoder); pf.start()
        pf.update(current_slice)            # on every slice change, from the GUI thread
        with pf.paused(): segment_slice(...) # keep the cores for an interactive decode (the running
                                             # encoder call waits at its next block boundary)
        pf.pause(); ...; pf.resume()        # the same across callbacks (counted, so they nest)
        pf.close(timeout=0)                 # on layer removal / widget close (0: do not wait)

    The encoder's own lock serialises the prefetcher with a foreground ``encoder.get``; a slice
    the user asks for that is not cached yet is embedded by the foreground call (or, if the
    prefetcher is on that very slice, by the prefetcher, which then does not wait), and the
    prefetcher then finds it cached.
    """

    def __init__(self, encoder: Any, *, ahead: int = 8, behind: int = 4, batch_size: int = 1,
                 on_ready: Callable[[int], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None, nice: int = 19,
                 preempt: bool = True) -> None:
        self.encoder = encoder
        self.preempt = bool(preempt)
        self.nice = int(nice)
        self.ahead = int(ahead)
        self.behind = int(behind)
        self.batch_size = max(1, int(batch_size))
        self.on_ready = on_ready
        self.on_error = on_error
        self._cond = threading.Condition()
        self._center: int | None = None
        self._direction = 1
        self._generation = 0
        self._stop = threading.Event()
        self._cancel = threading.Event()  # stops the running encoder call between its batches
        self._pause_count = 0
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.computed = 0
        # (center, cached, wanted) of the neighbourhood last looked at by the worker; one tuple, so
        # any thread can read it without a lock (a status line in a widget)
        self.progress: tuple[int | None, int, int] = (None, 0, 0)

    # -- control (any thread) -------------------------------------------------------------------
    def start(self) -> Prefetcher:
        """Start the worker thread (idempotent; after :meth:`stop` it waits for the old thread)."""
        if self._thread is not None and self._stop.is_set():
            self._thread.join()
            self._thread = None
            self._cancel.clear()
        if self._thread is None or not self._thread.is_alive():
            _stop_at_exit(self)
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="napari-medsam-prefetch", daemon=True)
            self._thread.start()
        return self

    def update(self, index: int) -> None:
        """The slice under view is now ``index``: prefetch around it (returns at once)."""
        index = int(index)
        with self._cond:
            if self._center is not None and index != self._center:
                self._direction = 1 if index > self._center else -1
            if index != self._center:
                self._center = index
                self._generation += 1
                self._idle.clear()
                self._cond.notify_all()

    def pending(self) -> list[int]:
        """Slices of the current neighbourhood that are not cached yet, most urgent first
        (also updates :attr:`progress`)."""
        with self._cond:
            center, direction = self._center, self._direction
        if center is None:
            return []
        order = prefetch_order(center, self.encoder.n_slices, ahead=self.ahead, behind=self.behind,
                               direction=direction)
        todo = [i for i in order if not self.encoder.is_cached(i)]
        self.progress = (center, len(order) - len(todo), len(order))
        return todo

    def pause(self) -> None:
        """Start no new encoder call until as many :meth:`resume` calls; with ``preempt`` the
        running one waits at its next block boundary (else it finishes its slice)."""
        with self._cond:
            self._pause_count += 1

    def resume(self) -> None:
        with self._cond:
            self._pause_count = max(0, self._pause_count - 1)
            self._cond.notify_all()

    @property
    def is_paused(self) -> bool:
        return self._pause_count > 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No encoder work inside this block (a running call stops at its next block boundary
        with ``preempt``, else after its slice)."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the current neighbourhood is cached (or stopped); False on timeout."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the worker (the running encoder call ends at its next block boundary with
        ``preempt``, else after its slice).

        Waits up to ``timeout`` seconds for the thread to end; ``timeout=0`` returns at once (a GUI
        thread must not wait for an encoder call), and :attr:`running` stays True until it has.
        """
        self._stop.set()
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and (timeout is None or timeout > 0):
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._thread = None
            self._cancel.clear()
        self._idle.set()

    close = stop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- worker ------------------------------------------------------------------------------------
    def _should_yield(self) -> bool:
        return self._pause_count > 0 and not self._stop.is_set()

    def _next_chunk(self) -> list[int] | None:
        """Wait for work; None when stopped."""
        with self._cond:
            while not self._stop.is_set():
                if self._pause_count == 0 and self._center is not None:
                    break
                self._cond.wait(0.5)
            if self._stop.is_set():
                return None
            gen = self._generation
        todo = self.pending()
        if not todo:
            with self._cond:
                if gen == self._generation:
                    self._idle.set()
                    self._cond.wait(0.5)
            return []
        return todo[: self.batch_size]

    def _run(self) -> None:
        from .progress import drain

        _lower_priority_of_this_thread(self.nice)
        while not self._stop.is_set():
            chunk = self._next_chunk()
            if chunk is None:
                return
            if not chunk:
                continue
            try:
                yield_to = self._should_yield if self.preempt else None
                summary = drain(self.encoder.embed(chunk, cancel=self._cancel, yield_to=yield_to))
            except Cancelled:
                return
            except (MedSamError, RuntimeError, OSError, ValueError) as e:
                self.error = e
                _log.warning("prefetch stopped: %s", e)
                if self.on_error is not None:
                    self.on_error(e)
                self._idle.set()
                return
            self.computed += int(summary.get("computed", 0))
            if self.on_ready is not None:
                for i in chunk:
                    self.on_ready(i)


def _stop_at_exit(pf: Prefetcher) -> None:
    """Stop ``pf`` at interpreter exit if it is still running.

    The worker is a daemon thread (it must never keep a closing application alive), but a daemon
    thread still inside a torch call when the interpreter finalises aborts the process; so every
    live prefetcher is told to stop at exit, then waited for (its current encoder call, at most
    :data:`EXIT_TIMEOUT` seconds), before the thread pools shut down (:func:`._exit.run_at_exit`).
    """
    _LIVE.add(pf)
    run_at_exit(_stop_all)


def _stop_all() -> None:
    live = [pf for pf in list(_LIVE) if pf.running]
    for pf in live:
        pf.stop(timeout=0)
    for pf in live:
        pf.stop(timeout=EXIT_TIMEOUT)


def _lower_priority_of_this_thread(nice: int) -> None:
    """Lower the calling thread's scheduling priority (Linux threads have their own nice value;
    the OpenMP workers it starts inherit it). Elsewhere, or without permission, nothing happens."""
    if nice <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
