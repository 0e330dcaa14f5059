"""The Annotate dock's live preview and background prefetching: every prompt change on the slice
under view re-runs the model in a thread worker; the latest prompt wins (a preview that comes back
for an older prompt or another slice is dropped)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .. import _layers
from ..app.bookkeeping import prompt_signature
from ..app.params import ModelChoice
from ..core.registry import DEFAULT_MODEL
from . import _gc, _workers
from ._shared import encoder_request, load_model_job

_TRANSIENT = ("adding", "changing", "removing")


def _action(event: Any) -> str:
    return str(getattr(event, "action", "") or "")


class PreviewMixin:
    """Preview, default-model loading and prefetch of the Annotate dock."""

    def _ensure_preview(self) -> Any:
        image = self.image_layer
        shape = _layers.spatial_shape(image)
        prev = self._preview
        if prev is not None and prev in self.viewer.layers and _layers.is_preview(prev, of=image) and \
                tuple(prev.data.shape) == shape and np.allclose(prev.scale, image.scale) and \
                np.allclose(prev.translate, image.translate):
            return prev
        if prev is not None and prev in self.viewer.layers:
            self.viewer.layers.remove(prev)
        prev = self.viewer.add_labels(**_layers.preview_kwargs(image, self.current_class))
        prev.editable = False
        self._bind_keys(prev)
        self._preview = prev
        self._preview_view = None
        self.labels_combo.refresh()
        self._reselect_prompt_layer()
        return prev

    # ---- preview ------------------------------------------------------------------------------------
    def _on_prompts_changed(self, event: Any = None) -> None:
        _gc.note_activity()
        if _action(event) in _TRANSIENT:
            return
        if self._prompt_time is None:
            self._prompt_time = time.perf_counter()
        # A finished prompt (a box released, a click) is one event: run at once instead of after the
        # debounce, which waited behind the canvas repaint the new shape triggers (~50 ms measured;
        # benchmarks/bench_gui.py). A preview already running marks itself dirty and re-runs.
        self._preview_timer.stop()
        self._run_preview()

    def _on_view_changed(self, event: Any = None) -> None:
        _gc.note_activity()
        self._follow_prefetch()
        self._update_status()  # the slice line names the slice under view along the axis sliced now
        self._schedule_preview()

    def _schedule_preview(self) -> None:
        self._preview_timer.start()

    def _snapshot(self) -> tuple[Any, _layers.SliceView, Any, Any, tuple] | None:
        image = self.image_layer
        if image is None:
            return None
        view = _layers.current_slice(self.viewer.dims, image)
        if view is None:
            return None
        pts, shp = self.prompt_layers(create=False)
        prompt = _layers.slice_prompt(pts, shp, image, view)
        req = encoder_request(image, self.viewer, self.session)
        tag = (id(image), id(_layers._plain_data(image)), view.axis, view.index, prompt_signature(prompt))
        return image, view, prompt, req, tag

    def _run_preview(self) -> None:
        if self._preview_job is not None and self._preview_job.running:
            self._preview_dirty = True
            return
        snap = self._snapshot()
        if snap is None:
            self._clear_preview()
            return
        image, view, prompt, req, tag = snap
        if prompt is None:
            self._clear_preview()
            self._prompt_time = None
            return
        if self._last is not None and self._last[0] == tag:
            return  # already on screen
        if self.session.loaded is None:
            self._load_default_model(then=self._schedule_preview)
            return
        if prompt.n_points and self.session.loaded.spec.box_preferred:
            self._hint(f"{self.session.loaded.name} was trained with boxes: draw a box (R) "
                       "around the structure for a reliable mask; points are experimental.")
        else:
            self._hint("")
        self._preview_dirty = False
        if not self.preview_in_worker or self._inline_ok(req, view.index):
            if self._run_inline(req, view, prompt, tag):
                return
        if self._decode_inline_after_embedding():
            got: dict[str, bool] = {}  # this job's own: did the "embedded" step arrive
            self.prefetch.hold()  # the encoder gets the cores; released in _on_embed_finished
            # a slice not embedded yet: the worker embeds it, the decode then runs here (one
            # decoder call on the main thread measured 36-40 ms against 140-167 ms in a worker
            # sharing the cores with the paint: benchmarks/bench_gui.py)
            self._preview_job = _workers.start(
                lambda cancel: self.session.embed_slice_steps(req, view.index), desc="MedSAM preview",
                cancelable=False, on_progress=lambda p, got=got: self._on_embed_step(p, tag, got),
                on_finished=lambda job, got=got: self._on_embed_finished(got))
            return
        self._start_worker_preview(req, view, prompt, tag)

    def _start_worker_preview(self, req: Any, view: _layers.SliceView, prompt: Any, tag: tuple) -> None:
        """Embed (if needed) and decode in a worker; the prefetcher is held until it ends."""
        self.prefetch.hold()  # the decoder gets the cores; released in _on_preview_finished
        self._preview_job = _workers.start(
            lambda cancel: self.session.preview_steps(req, view.index, prompt), desc="MedSAM preview",
            cancelable=False, on_returned=lambda res: self._on_preview_result(tag, view, res),
            on_finished=self._on_preview_finished)

    def _inline_ok(self, req: Any, index: int) -> bool:
        """An embedded slice, and no decode on the main thread has taken longer than
        :attr:`inline_preview_s` (the first one is tried)."""
        return self._decode_fits() and self.session.embedded(req, index)

    def _decode_inline_after_embedding(self) -> bool:
        return self.preview_in_worker and self._decode_fits()

    def _decode_fits(self) -> bool:
        """No decode on the main thread has taken longer than :attr:`inline_preview_s` (None: never inline)."""
        limit, last = self.inline_preview_s, self._decode_s
        return limit is not None and (last is None or last <= limit)

    def _on_embed_step(self, p: Any, tag: tuple, got: dict[str, bool]) -> None:
        """The prompt's slice can be decoded (its cache write goes on in the worker): the preview of
        the prompt now on screen, on this thread (the prefetcher stays held until the job ends)."""
        if p.message != "embedded":
            return
        got["embedded"] = True
        if p.info.get("embedded_now"):
            self.session.embeddings_changed.emit(tag[0])
        self._preview_job = None
        snap = self._snapshot()
        if snap is not None and snap[4] == tag and snap[2] is not None:
            if not self._run_inline(snap[3], snap[1], snap[2], tag):
                self._start_worker_preview(snap[3], snap[1], snap[2], tag)  # it reports the failure
        else:
            self._run_preview()  # the prompt or the slice changed meanwhile: the latest one

    def _on_embed_finished(self, got: dict[str, bool]) -> None:
        try:
            if not got.get("embedded"):  # failed before the slice was embedded: nothing to commit
                self._commit_pending = False
        finally:
            self.prefetch.release()

    def _run_inline(self, req: Any, view: _layers.SliceView, prompt: Any, tag: tuple) -> bool:
        """The preview on the main thread (one decoder call); False if it failed (the worker then
        runs it and reports the error as every preview does)."""
        from ..core.progress import drain

        self._preview_job = None
        self.prefetch.hold()
        try:
            t0 = time.perf_counter()
            res = drain(self.session.preview_steps(req, view.index, prompt))
            self._decode_s = time.perf_counter() - t0
        except Exception:  # noqa: BLE001 - shown by the worker path below
            self._decode_s = None
            return False
        finally:
            self.prefetch.release()
        self._on_preview_result(tag, view, res, compute=self._decode_s)
        return True

    def _on_preview_result(self, tag: tuple, view: _layers.SliceView, res: Any, compute: float | None = None) -> None:
        snap = self._snapshot()
        if snap is None or snap[4] != tag:
            self._preview_dirty = True  # the prompt or the slice changed meanwhile: run again
            return
        if self.image_layer is None:
            return
        self._draw_preview(res.mask, view)  # may replace the preview layer (which resets _last)
        self._last = (tag, res)
        job = self._preview_job
        if compute is None:  # from the worker
            compute = (float(job.last.info.get("seconds", float("nan")))
                       if job is not None and job.last is not None else float("nan"))
            if not self._job_embedded(job) and compute == compute and self._decode_s is not None:
                # a decode timed in a worker (sharing the cores with the paint) is slower than on the
                # main thread: under the limit, the main thread may take the next one again
                self._decode_s = min(self._decode_s, compute)
        if self._prompt_time is not None:
            self.last_latency = time.perf_counter() - self._prompt_time
            self._prompt_time = None
            self.previews_shown += 1
            self.preview_shown.emit(self.last_latency, compute)
        self._update_status(iou=res.iou)
        if self._job_embedded(self._preview_job):
            self.session.embeddings_changed.emit(tag[0])
        if self._commit_pending:
            self._commit_pending = False
            self.commit()

    @staticmethod
    def _job_embedded(job: _workers.Job | None) -> bool:
        return bool(job is not None and job.last is not None and job.last.info.get("embedded_now"))

    def _on_preview_finished(self, job: _workers.Job) -> None:
        self.prefetch.release()
        if self._preview_dirty:  # prompts changed while it ran: run the latest (a pending commit waits)
            self._preview_dirty = False
            self._schedule_preview()
        else:  # done, or failed (the error was shown): a pending commit has nothing to wait for
            self._commit_pending = False

    def _draw_preview(self, mask: np.ndarray | None, view: _layers.SliceView | None = None) -> None:
        if self.image_layer is None:
            return
        view = view or self._preview_view
        if view is None:
            return
        prev = self._ensure_preview()
        _layers.show_preview(prev, view, mask, 1, self._preview_view)
        self._preview_view = view

    def _clear_preview(self) -> None:
        self._last = None
        if self._preview is not None and self._preview in self.viewer.layers and self._preview_view is not None:
            _layers.show_preview(self._preview, self._preview_view, None, 0, self._preview_view)
        self._preview_view = None

    def _cancel_preview(self) -> None:
        self._preview_timer.stop()
        self._commit_pending = False
        self._prompt_time = None

    # ---- model --------------------------------------------------------------------------------------
    def _load_default_model(self, then: Any = None) -> None:
        if self.load_job is not None and self.load_job.running:
            return
        choice = ModelChoice(DEFAULT_MODEL)
        self.status_label.setText(f"Loading {choice.name} (first prompt)…")

        def done(job: _workers.Job) -> None:
            if self.session.loaded is not None and then is not None:
                then()

        self.load_job = load_model_job(self.session, choice, on_done=done)

    def _on_model_changed(self, loaded: Any) -> None:
        self._last = None
        self._follow_prefetch()
        self._schedule_preview()
        self._update_status()

    # ---- prefetch -----------------------------------------------------------------------------------
    def _follow_prefetch(self) -> None:
        """Tell the prefetcher which slice is under view (cheap: every dims event comes here)."""
        image = self.image_layer
        view = _layers.current_slice(self.viewer.dims, image) if image is not None else None
        self.prefetch.follow(image, view, lambda: encoder_request(image, self.viewer, self.session))
        if self.prefetch.prefetcher is not None or self.prefetch.status():
            if not self._prefetch_timer.isActive():
                self._prefetch_timer.start()
        else:
            self._show_prefetch_status()

    def _on_embeddings_changed(self, image_id: Any) -> None:
        """Another dock embedded slices or changed how they are computed (the intensity): follow it."""
        image = self.image_layer
        if image is not None and image_id == id(image):
            self._follow_prefetch()

    def _on_prefetch_toggled(self, checked: bool) -> None:
        self.prefetch.set_enabled(checked)
        self._follow_prefetch()

    def _show_prefetch_status(self) -> None:
        text = self.prefetch.status()
        if text != self.prefetch_label.text():  # a new text re-lays out the dock: only on change
            self.prefetch_label.setText(text)
            self.prefetch_label.setToolTip(self.prefetch.error_text())
            image = self.image_layer
            if image is not None and self.prefetch.prefetcher is not None:
                self.session.embeddings_changed.emit(id(image))  # e.g. the Model dock's "n slices cached"
        if not text:
            self._prefetch_timer.stop()
