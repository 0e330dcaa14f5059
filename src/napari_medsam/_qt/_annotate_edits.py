"""The Annotate dock's edits: commit, propagate, clear, undo. What is written and remembered is
the session's (:meth:`~napari_medsam.app.session.AnnotationSession.write_masks` and
:meth:`~napari_medsam.app.session.AnnotationSession.write_propagation`, its edit log); this module
snapshots the layers, runs the job and reports. Propagated slices are proposals until reviewed: a
brush stroke, fill or erase on a slice of the labels layer reviews it (the session is told), and a
new propagation of the class replaces its earlier unreviewed proposals."""

from __future__ import annotations

import weakref
from typing import Any

from .. import _layers
from . import _workers


class EditsMixin:
    """Commit, propagate, clear and undo of the Annotate dock."""

    # ---- commit / propagate / clear / undo ---------------------------------------------------------
    def commit(self) -> None:
        """Write the preview of the slice under view into the Labels layer (current class, where 0)."""
        snap = self._snapshot()
        if snap is None:
            return
        image, view, prompt, _req, tag = snap
        if prompt is None:
            self._hint("Nothing to commit: click a point or draw a box first.")
            return
        if self._last is None or self._last[0] != tag:
            self._commit_pending = True  # commit as soon as the preview of this prompt arrives
            self._schedule_preview()
            return
        labels = self._target_labels()
        if labels is None:
            return
        cls = self.current_class
        edit = self.session.commit(view.index, self._last[1].mask, cls.label_id, target=labels, view=view,
                                   name=cls.name)
        self._remove_prompts(image, view)
        n = 0 if edit is None else edit.n_voxels
        self.status_label.setText(f"Committed {cls.name} (label {cls.label_id}) on slice {view.index}: {n} voxels.")

    def propagate(self) -> None:
        """Carry the current class through the volume from its prompts / committed slices (worker)."""
        if self.propagate_job is not None and self.propagate_job.running:
            return
        snap = self._snapshot()
        if snap is None:
            return
        image, view, _prompt, req, _tag = snap
        if not view.is_3d:
            self._hint("Propagation needs a 3D volume; on a 2D image use Commit.")
            return
        if self.session.loaded is None:
            self._load_default_model(then=self.propagate)
            return
        span = self.propagation_span(view)
        if span is False:
            return
        labels = self.labels_layer
        cls = self.current_class
        pts, shp = self.prompt_layers(create=False)
        prompts = _layers.layer_prompts(pts, shp, image, view)
        seeds, _kept = self.session.seeds(cls.label_id, view, target=labels, prompts=prompts)
        if not seeds:
            self._hint("Nothing to propagate: draw a box on a slice (and commit it) first.")
            return
        self._hint("")
        _workers.show_progress(self.progress_bar)
        self.cancel_button.setEnabled(True)
        self.propagate_button.setEnabled(False)
        self.status_label.setText(f"Propagating {cls.name} from slice(s) {sorted(seeds)}…")
        labels_ref = weakref.ref(labels) if labels is not None else None
        image_ref = weakref.ref(image)

        def returned(masks: Any) -> None:
            self._on_propagated(image_ref, labels_ref, view, cls, masks, set(seeds))

        self.propagate_job = self.session.hold_cpu(_workers.start(  # prefetching waits meanwhile
            lambda cancel: self.session.propagate_steps(req, seeds, cancel=cancel, span=span),
            desc=f"Propagating {cls.name}", on_progress=self._on_job_progress, on_returned=returned,
            on_finished=self._on_propagate_finished, show_bar=self.session.napari_progress))

    def set_range_end(self, end: str) -> None:
        """Put the slice in view (along the sliced axis) as the ``"start"`` or ``"stop"`` of *Propagate
        within*, keeping the other end; the two are swapped if they come out reversed."""
        image = self.image_layer
        view = _layers.current_slice(self.viewer.dims, image) if image is not None else None
        if view is None:
            return
        lo, sep, hi = self.range_edit.text().strip().partition(":")
        if not sep:
            lo = hi = ""
        lo, hi = (str(view.index), hi.strip()) if end == "start" else (lo.strip(), str(view.index))
        if lo.isdigit() and hi.isdigit() and int(lo) > int(hi):
            lo, hi = hi, lo
        self.range_edit.setText(f"{lo}:{hi}")

    def propagation_span(self, view: _layers.SliceView) -> tuple[int, int] | None | bool:
        """The half-open slice range typed in *Propagate within* (None: the whole volume; False: the
        text is not a range, and the hint says why)."""
        from ..core.errors import PromptError
        from ..core.propagation import parse_range

        text = self.range_edit.text().strip()
        if not text:
            return None
        try:
            return parse_range(text, view.n_slices, inclusive=True)
        except PromptError as e:
            self._hint(f"{e} — e.g. 40:75 (both ends included), or leave it empty for every slice.")
            return False

    def _on_job_progress(self, p: Any) -> None:
        _workers.show_progress(self.progress_bar, p)

    def _on_propagated(self, image_ref: Any, labels_ref: Any, view: _layers.SliceView, cls: _layers.LabelClass,
                       masks: Any, seeds: set[int]) -> None:
        image = image_ref()
        if image is None or image not in self.viewer.layers:
            self.status_label.setText("The image was removed during propagation; nothing was written.")
            return
        labels = labels_ref() if labels_ref is not None else None
        if labels is None or labels not in self.viewer.layers or not _layers.fits(labels, image):
            if self.image_layer is not image:
                self.status_label.setText("The image changed during propagation; nothing was written.")
                return
            labels = self._target_labels()
        edit = self.session.write_propagation(labels, view, masks, cls.label_id, seeds=seeds,
                                              description=f"propagate {cls.name}")
        self._watch_paint(labels)
        pts, shp = self.prompt_layers(create=False)
        if self.image_layer is image:
            _layers.remove_prompts(pts, shp, image, None)
            self._clear_preview()
        span = f"slices {min(masks)}-{max(masks)}" if masks else "no slice"
        n = 0 if edit is None else edit.n_voxels
        stops = "; ".join(f"{'down' if s.direction < 0 else 'up'} to {s.last} ({s.reason})"
                          for s in getattr(masks, "stops", ()))
        self.status_label.setText(f"Propagated {cls.name} over {len(masks)} slices ({span}), proposals until you "
                                  f"edit them; {n} voxels changed." + (f" Stopped {stops}." if stops else ""))
        self.session.embeddings_changed.emit(id(image))

    def _watch_paint(self, labels: Any) -> None:
        """Brush, fill and erase on ``labels`` review the slices they touch (once per layer)."""
        watched = self.__dict__.setdefault("_paint_watched", weakref.WeakSet())
        if labels in watched:
            return
        watched.add(labels)
        ref = weakref.ref(labels)

        def on_paint(event: Any) -> None:
            layer = ref()
            image = self.image_layer
            view = _layers.current_slice(self.viewer.dims, image) if image is not None else None
            if layer is None or view is None or not view.is_3d or self.session.writing_proposals:
                return  # a propagation or an undo writing, not the user
            self.session.mark_reviewed(layer, view.axis, sorted(_layers.painted_slices(event, view.axis, view.n_slices)))

        labels.events.paint.connect(on_paint)

    def _on_propagate_finished(self, job: _workers.Job) -> None:
        self.progress_bar.setVisible(False)
        self.cancel_button.setEnabled(False)
        self.propagate_button.setEnabled(True)
        if job.cancelled:
            self.status_label.setText("Propagation cancelled; nothing was written.")

    def cancel(self) -> None:
        if self.propagate_job is not None:
            self.propagate_job.cancel()

    def clear_slice(self) -> None:
        """Remove the prompts on the slice under view and the preview."""
        image = self.image_layer
        view = _layers.current_slice(self.viewer.dims, image) if image is not None else None
        if view is not None:
            self._remove_prompts(image, view)

    def clear_all(self) -> None:
        """Remove every prompt of the selected image and the preview."""
        if self.image_layer is not None:
            self._remove_prompts(self.image_layer, None)

    def _remove_prompts(self, image: Any, view: _layers.SliceView | None) -> None:
        """The prompts of ``image`` on ``view`` (None: every slice) and the preview go."""
        pts, shp = self.prompt_layers(create=False)
        self._cancel_preview()
        _layers.remove_prompts(pts, shp, image, view)
        self._clear_preview()

    def undo(self) -> None:
        """Undo the last commit or propagation (voxels repainted since then are left alone)."""
        edit = self.session.undo(lambda labels: labels in self.viewer.layers)
        self.status_label.setText("Nothing to undo." if edit is None else
                                  f"Undid {edit.description} ({edit.n_voxels} voxels).")
