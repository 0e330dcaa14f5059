"""Keeps one background :class:`~napari_medsam.core.prefetch.Prefetcher` on the slice under view.

The Annotate widget owns a :class:`SlicePrefetch` and tells it, from the GUI thread, which image
and slice are under view (:meth:`SlicePrefetch.follow`, on every dims event: cheap, never waits).
It keeps a prefetcher on the session's encoder for that image, axis, intensity choice and model,
so the prefetcher, the preview and propagation share one encoder and one cache, and nothing is
embedded twice (the encoder's lock serialises them; a slice one of them embedded is a cache hit
for the others).

* The first time an image is followed, its encoder is built in a thread worker (sampling the
  intensities and hashing the volume); the prefetcher starts when it arrives, if the user is still
  on that image.
* A new model, new data, another axis or intensity choice, or another image: the old prefetcher is
  stopped (without waiting for its encoder call: it ends after the slice it is on) and a new one
  starts on the new encoder.
* :meth:`hold` / :meth:`release` (the widget's previews) and the session's ``cpu_jobs``
  (propagation, whole-image embedding, training, prediction) pause it: while any of them runs, its
  encoder call waits at the next block of the network (``preempt``, the default) and it starts no
  new one.
* :meth:`close` (the widget closes) stops it for good.

No Qt here beyond the thread worker that builds an encoder.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import _layers
from ..app.session import AnnotationSession
from . import _workers

__all__ = ["SlicePrefetch"]

_log = logging.getLogger(__name__)


class SlicePrefetch:
    """Background embedding of the neighbours of the slice under view, for one widget."""

    def __init__(self, session: AnnotationSession, *, enabled: bool = True, ahead: int = 8, behind: int = 4) -> None:
        self.session = session
        self.enabled = bool(enabled)
        self.ahead = int(ahead)
        self.behind = int(behind)
        self.preempt = True  # a pause stops the running encoder call between two blocks (core.prefetch)
        self.prefetcher: Any = None
        self.error: BaseException | None = None
        self._key: tuple | None = None  # what the prefetcher (or the encoder being built) is for
        self._index: int | None = None
        self._build_job: _workers.Job | None = None
        self._holds = 0
        self._paused = False  # whether we paused self.prefetcher
        self._closed = False
        session.busy_changed.connect(self._apply_pause)

    # -- main thread ----------------------------------------------------------------------------------
    def follow(self, image: Any, view: _layers.SliceView | None, make_request: Any) -> None:
        """``image``'s slice ``view`` is under view; ``make_request()`` snapshots an
        :class:`~napari_medsam.app.session.EncoderRequest` for it (called only when the image,
        its data, the axis, the intensity choice or the model changed)."""
        loaded = self.session.loaded
        if self._closed or not self.enabled or image is None or loaded is None:
            self.stop()
            return
        same = (id(image), id(_layers._plain_data(image)), self.session.intensity, loaded)
        if view is None:  # the viewer's point lies outside the image: keep what we have, if it is for it
            if self._key is not None and (*self._key[:2], *self._key[3:]) != same:
                self.stop()
            return
        key = (*same[:2], view.axis, *same[2:])
        self._index = view.index
        if key != self._key:
            self.stop()
            self._key = key
            req = make_request()
            if req is None:
                return
            enc = self.session.peek_encoder(req)
            if enc is not None:
                self._start(enc)
            else:
                self._build_job = _workers.start(
                    lambda cancel: self.session.encoder_steps(req), desc="MedSAM prefetch", cancelable=False,
                    notify_errors=False, on_returned=lambda enc: self._on_encoder(key, enc),
                    on_error=lambda exc: self._on_build_error(key, exc))
                return
        if self.prefetcher is not None:
            self.prefetcher.update(view.index)

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        if not self.enabled:
            self.stop()

    def hold(self) -> None:
        """Pause until :meth:`release` (counted)."""
        self._holds += 1
        self._apply_pause()

    def release(self) -> None:
        self._holds = max(0, self._holds - 1)
        self._apply_pause()

    def stop(self) -> None:
        """Stop prefetching (returns at once; the thread ends after its current encoder call)."""
        self._key = None
        self.error = None
        if self._build_job is not None:
            self._build_job.cancel()
            self._build_job = None
        pf, self.prefetcher, self._paused = self.prefetcher, None, False
        if pf is not None:
            pf.close(timeout=0)

    def close(self) -> None:
        """Stop for good (the widget closes)."""
        if not self._closed:
            self._closed = True
            self.stop()
            self.session.busy_changed.disconnect(self._apply_pause)

    def status(self) -> str:
        """A short line for the widget: how many slices around the current one are embedded."""
        pf = self.prefetcher
        if self.error is not None:
            return "prefetch stopped"
        if pf is None:
            return "preparing…" if self._key is not None and self._build_job is not None else ""
        if pf.error is not None:
            return "prefetch stopped"
        center, ready, wanted = pf.progress  # the worker's last look; it catches up within one slice
        if center is None:
            return "…"
        text = f"{ready} / {wanted} ready"
        return f"{text} (paused)" if self._paused and ready < wanted else text

    def error_text(self) -> str:
        pf = self.prefetcher
        err = self.error or (pf.error if pf is not None else None)
        return "" if err is None else f"{type(err).__name__}: {err}"

    # -- internals (main thread) ------------------------------------------------------------------------
    def _on_encoder(self, key: tuple, enc: Any) -> None:
        if key != self._key or self._closed or enc.loaded is not self.session.loaded:
            return  # the user moved on while it was built
        self._build_job = None
        self._start(enc)
        if self._index is not None:
            self.prefetcher.update(self._index)

    def _on_build_error(self, key: tuple, exc: BaseException) -> None:
        if key != self._key:
            return
        self._build_job = None
        self.error = exc  # kept until the image, data, axis or model change: no retry per slider step
        _log.info("prefetching is off for this image: %s", exc)

    def _start(self, enc: Any) -> None:
        from ..core.prefetch import Prefetcher

        self.error = None
        self.prefetcher = Prefetcher(enc, ahead=self.ahead, behind=self.behind, preempt=self.preempt).start()
        self._paused = False
        self._apply_pause()

    def _apply_pause(self, *_: Any) -> None:
        want = self._holds > 0 or self.session.cpu_jobs > 0
        pf = self.prefetcher
        if pf is None or want == self._paused:
            return
        if want:
            pf.pause()
        else:
            pf.resume()
        self._paused = want
