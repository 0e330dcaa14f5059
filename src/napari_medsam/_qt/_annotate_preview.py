"""The Annotate dock's live preview and background prefetching: every prompt change on the slice
under view re-runs the model in a thread worker; the latest prompt wins (a preview that comes back
for an older prompt or another slice is dropped).

A small box is then zoomed (the session's :attr:`~napari_medsam.app.session.AnnotationSession.zoom`,
the dock's "Zoom in on small objects"): after its quick preview is drawn, a worker embeds the window
around the box (one encoder call) and the decode on it runs here (one decoder call); the zoomed
mask replaces the quick one and is what Commit writes. While it runs, ``_last`` (the preview Commit
writes) is None and the quick one waits in ``_quick``: a Commit pressed meanwhile waits for it."""

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
            self._hold_while_drawing()
            return
        if self._prompt_time is None:
            self._prompt_time = time.perf_counter()
        # A finished prompt (a box released, a click) is one event: run at once instead of after the
        # debounce, which waited behind the canvas repaint the new shape triggers (~50 ms measured;
        # benchmarks/bench_gui.py). A preview already running marks itself dirty and re-runs.
        self._preview_timer.stop()
        try:
            self._run_preview()
        finally:
            self._end_drawing()  # after the preview took its own hold: the prefetcher stays paused

    def _hold_while_drawing(self) -> None:
        """A prompt is being drawn or edited (napari's "adding" comes with the mouse press that starts
        a box, "changing" while a vertex is dragged): the prefetcher pauses now, so that when the
        mouse is released its encoder call has reached a checkpoint and let go of the encoder and
        the cores (a box on a slice not embedded yet waited 12-117 ms for it otherwise:
        benchmarks/bench_gui.py). Released by the prompt's final event, or after
        :attr:`drawing_hold_s` if none comes (a drawing abandoned)."""
        if not self._drawing and self.hold_while_drawing:
            self._drawing = True
            self.prefetch.hold()
        self._drawing_timer.start(int(1000 * self.drawing_hold_s))

    def _end_drawing(self) -> None:
        self._drawing_timer.stop()
        if self._drawing:
            self._drawing = False
            self.prefetch.release()

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
        if self._refine_tag == tag and self._quick is not None and self._quick[0] == tag:
            return  # its quick preview is on screen and the zoomed one on its way
        if self.session.loaded is None:
            self._load_default_model(then=self._schedule_preview)
            return
        if prompt.n_points and self.session.loaded.spec.box_preferred:
            self._hint(f"{self.session.loaded.name} was trained with boxes: draw a box (R) "
                       "around the structure for a reliable mask; points are experimental.")
        else:
            self._hint("")
        self._preview_dirty = False
        if (not self.preview_in_worker or self._inline_ok(req, view.index)) and self._run_inline(req, view, prompt, tag):
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
        prompt_time = self._prompt_time
        if self._start_refine(snap, prompt_time):  # a small box: the zoomed mask follows, Commit waits for it
            self._last, self._quick = None, (tag, res)
        else:
            self._last, self._quick, self._refine_tag = (tag, res), None, None
            self._zoom_note = ""
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
        if self._commit_pending and self._last is not None:
            self._commit_pending = False
            self.commit()

    # ---- zoom: a small box decoded again on the window around it -----------------------------------
    def _start_refine(self, snap: tuple, prompt_time: float | None) -> bool:
        """Zoom the prompt of ``snap`` (its quick preview is on screen) if the session gives it a
        window: a worker embeds the window (one at a time: a newer prompt's refine starts when the
        running one ends). False: no window (zoom off, no box, a large box)."""
        _image, view, prompt, req, tag = snap
        if self.session.zoom_window(req, view.index, prompt) is None:
            return False
        self._refine_tag, self._refine_prompt_time = tag, prompt_time
        self._zoom_note = "zooming…"
        if self._refine_job is not None and self._refine_job.running:
            self._refine_dirty = True  # an older prompt's encoder call is running: this one follows it
        else:
            self._launch_refine(req, view, prompt, tag)
        return True

    def _launch_refine(self, req: Any, view: _layers.SliceView, prompt: Any, tag: tuple) -> None:
        # this job's own: the encoder it embeds with, the "embedded" step, the returned value
        got: dict[str, Any] = {"encoder": self.session.peek_encoder(req)}
        self._refine_dirty = False
        self.prefetch.hold()  # the encoder gets the cores; released in _on_refine_finished
        self._refine_job = _workers.start(
            lambda cancel: self.session.refine_steps(req, view.index, prompt), desc="MedSAM zoom",
            cancelable=False, on_progress=lambda p, got=got: self._on_refine_step(p, tag, got),
            on_returned=lambda ran, got=got: got.__setitem__("returned", ran),
            on_finished=lambda job, got=got: self._on_refine_finished(tag, got))

    def _on_refine_step(self, p: Any, tag: tuple, got: dict[str, Any]) -> None:
        """The window is embedded: decode the prompt on it here (one decoder call) if it is still the
        prompt on screen, draw the zoomed mask and make it the preview Commit writes."""
        if p.message != "embedded":
            return
        got["embedded"] = True
        snap = self._snapshot()
        if tag != self._refine_tag or snap is None or snap[4] != tag or snap[2] is None:
            return  # a newer prompt or another slice: dropped (the newer one's refine follows)
        _image, view, prompt, req, _tag = snap
        if got["encoder"] is None or self.session.peek_encoder(req) is not got["encoder"]:
            # the intensity or the model changed meanwhile: decoding now would embed the window
            # again on this thread; preview the prompt afresh instead (quick, then zoomed)
            self._last, self._quick, self._refine_tag = None, None, None
            self._schedule_preview()
            return
        if not self.session.zoom_ready(req, view.index, prompt):
            # the window's embedding left the encoder's memory meanwhile (other windows embedded):
            # decoding now would embed it again on this thread; the worker does, once this job ends
            self._refine_dirty = True
            return
        try:  # the refine job's own hold keeps the prefetcher paused until it ends
            t0 = time.perf_counter()
            res = self.session.refined(req, view.index, prompt)
            decode_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - the quick preview stays, and says so
            self._settle_quick(commit=False, note=f"zoom failed ({type(e).__name__}: {e})")
            return
        if res is None:  # zoom was switched off meanwhile: the quick preview is the one
            self._settle_quick(commit=True)
            return
        self._draw_preview(res.mask, view)
        self._last, self._quick, self._refine_tag = (tag, res), None, None
        self._zoom_note = f"zoomed ×{float(p.info.get('gain', float('nan'))):.1f}"
        t_prompt = self._refine_prompt_time
        self._refine_prompt_time = None
        self.zooms_shown += 1
        self.last_zoom_latency = None if t_prompt is None else time.perf_counter() - t_prompt
        if self.last_zoom_latency is not None:
            self.zoom_shown.emit(self.last_zoom_latency, float(p.info.get("seconds", float("nan"))) + decode_s)
        self._update_status(iou=res.iou)
        if self._commit_pending:
            self._commit_pending = False
            self.commit()

    def _on_refine_finished(self, tag: tuple, got: dict[str, Any]) -> None:
        self.prefetch.release()
        self._refine_job = None
        if not got.get("embedded") and tag == self._refine_tag:
            if got.get("returned") is False:  # no window any more (zoom switched off): the quick one
                self._settle_quick(commit=True)
            else:  # failed (the error was shown): the quick preview stays; a pending commit is dropped
                self._settle_quick(commit=False, note="zoom failed")
        if self._refine_dirty:  # a newer prompt's quick preview came meanwhile: its refine now
            self._refine_dirty = False
            snap = self._snapshot()
            if snap is not None and snap[2] is not None and self._refine_tag == snap[4] and \
                    self._quick is not None and self._quick[0] == snap[4]:
                self._launch_refine(snap[3], snap[1], snap[2], snap[4])

    def _settle_quick(self, *, commit: bool, note: str = "") -> None:
        """No zoomed mask for the prompt on screen: its quick preview is the one Commit writes (a
        commit pressed meanwhile goes ahead only when ``commit``)."""
        quick, self._quick, self._refine_tag = self._quick, None, None
        self._zoom_note = note
        snap = self._snapshot()
        if quick is not None and snap is not None and snap[4] == quick[0]:
            self._last = quick
            self._update_status(iou=quick[1].iou)
        if self._commit_pending and not commit:
            self._commit_pending = False
        elif self._commit_pending and self._last is not None:
            self._commit_pending = False
            self.commit()

    def _on_zoom_toggled(self, checked: bool) -> None:
        """"Zoom in on small objects": the prompt on screen is previewed again, zoomed or not."""
        if checked:
            self.session.zoom = self._zoom_context
        else:
            if self.session.zoom is not None:
                self._zoom_context = self.session.zoom
            self.session.zoom = None
        self._last, self._quick, self._refine_tag, self._zoom_note = None, None, None, ""
        self._schedule_preview()

    @staticmethod
    def _job_embedded(job: _workers.Job | None) -> bool:
        return bool(job is not None and job.last is not None and job.last.info.get("embedded_now"))

    def _on_preview_finished(self, job: _workers.Job) -> None:
        self.prefetch.release()
        if self._preview_dirty:  # prompts changed while it ran: run the latest (a pending commit waits)
            self._preview_dirty = False
            self._schedule_preview()
        elif self._refine_tag is None:  # done, or failed (the error was shown), and no zoomed
            self._commit_pending = False  # preview on its way: a pending commit has nothing to wait for

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
        self._quick, self._refine_tag, self._zoom_note = None, None, ""  # a running refine is dropped
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
        self._last, self._quick, self._refine_tag = None, None, None  # a running refine is dropped
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
