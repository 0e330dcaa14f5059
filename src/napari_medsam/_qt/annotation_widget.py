"""Annotation dock widget: prompts -> live preview -> commit into a Labels layer -> 3D propagation.

Points (positive / negative clicks) and boxes live in a Points and a Shapes layer made for the
selected image. Every prompt change on the slice under view re-runs the model in a thread worker
(the latest prompt wins; a preview that comes back for an older prompt or another slice is
dropped). *Commit* writes the preview into the Labels layer with the current class's label, only
where the labels are 0. *Propagate* carries the object through the volume in a worker. While the
user browses, the slices around the one under view are embedded in the background
(:class:`~napari_medsam._qt._prefetch.SlicePrefetch`), so that moving to them answers at decoder
speed. The geometry (world -> data, which axis is sliced) is :mod:`napari_medsam._layers`'s job; the
model work and the edit log are the :class:`~napari_medsam.app.session.AnnotationSession`'s.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
)

from .. import _layers
from ..app.bookkeeping import prompt_signature
from ..app.params import ModelChoice
from ..app.session import AnnotationSession
from ..core.registry import DEFAULT_MODEL
from . import _workers
from ._class_table import ClassTable
from ._dock import DockWidget
from ._layer_combo import LayerCombo
from ._prefetch import SlicePrefetch
from ._shared import encoder_request, is_image, load_model_job
from .session import session_for

SHORTCUTS = (
    ("Click", "positive point (Points layer in add mode, key P)"),
    ("Shift+click", "negative point"),
    ("N", "toggle negative clicks"),
    ("R", "draw a box (Shapes layer in rectangle mode)"),
    ("C", "commit the preview into the labels"),
    ("G", "propagate the current class through the volume"),
    ("Q", "clear the prompts on this slice"),
    ("Shift+Q", "clear all prompts"),
    ("U", "undo the last commit or propagation"),
)
SHORT_NAMES = {"Click": "positive point", "Shift+click": "negative point", "N": "negative clicks",
               "R": "box", "C": "commit", "G": "propagate", "Q": "clear slice", "Shift+Q": "clear all",
               "U": "undo"}
_TRANSIENT = ("adding", "changing", "removing")


def _action(event: Any) -> str:
    return str(getattr(event, "action", "") or "")


class AnnotationWidget(DockWidget):
    """Prompted segmentation of the selected image into a Labels layer, class by class."""

    def __init__(self, napari_viewer: Any, *, session: AnnotationSession | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer = _layers.unwrap(napari_viewer)
        self.session = session or session_for(napari_viewer)
        self._prompt_layers: dict[int, tuple[Any, Any]] = {}
        self._preview: Any = None
        self._preview_view: _layers.SliceView | None = None
        self._last: tuple[tuple, Any] | None = None  # (tag, MaskResult) of the preview on screen
        self._preview_job: _workers.Job | None = None
        self._preview_dirty = False
        self._prompt_time: float | None = None
        self._commit_pending = False
        self._negative = False
        self._watched_image: Any = None
        self.load_job: _workers.Job | None = None
        self.propagate_job: _workers.Job | None = None
        self.latencies: list[float] = []  # seconds from a prompt change to its preview on screen
        self.compute_times: list[float] = []  # seconds the model took for each of those previews
        self.preview_in_worker = True  # False decodes on the main thread (benchmarks/bench_gui.py compares)
        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(15)
        self._preview_timer.timeout.connect(self._run_preview)
        self.prefetch = SlicePrefetch(self.session)
        self._prefetch_timer = QTimer(self)  # refreshes the "n / m ready" line while prefetching
        self._prefetch_timer.setInterval(400)
        self._prefetch_timer.timeout.connect(self._show_prefetch_status)

        # -- layers
        self.image_combo = LayerCombo(napari_viewer, is_image)
        self.labels_combo = LayerCombo(napari_viewer, self._accept_labels, extra="new labels layer")
        lform = QFormLayout()
        lform.addRow("Image", self.image_combo)
        lform.addRow("Labels", self.labels_combo)

        # -- classes
        self.class_box = ClassTable()
        self.class_table = self.class_box.table

        # -- prompts and actions
        self.points_button = QPushButton("Points (P)")
        self.box_button = QPushButton("Box (R)")
        self.negative_button = QPushButton("Negative clicks (N)")
        self.negative_button.setCheckable(True)
        self.commit_button = QPushButton("Commit (C)")
        self.propagate_button = QPushButton("Propagate (G)")
        self.clear_button = QPushButton("Clear (Q)")
        self.undo_button = QPushButton("Undo (U)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        grid = QGridLayout()
        grid.addWidget(self.points_button, 0, 0)
        grid.addWidget(self.box_button, 0, 1)
        grid.addWidget(self.negative_button, 0, 2)
        grid.addWidget(self.commit_button, 1, 0)
        grid.addWidget(self.propagate_button, 1, 1)
        grid.addWidget(self.cancel_button, 1, 2)
        grid.addWidget(self.clear_button, 2, 0)
        grid.addWidget(self.undo_button, 2, 1)
        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        self.prefetch_check = QCheckBox("Prefetch neighbouring slices")
        self.prefetch_check.setChecked(self.prefetch.enabled)
        self.prefetch_check.setToolTip("embed the slices around the one under view in the background (at low "
                                       "priority, paused while propagating), so moving to them is instant")
        self.prefetch_label = QLabel("")
        prefetch_row = QHBoxLayout()
        prefetch_row.addWidget(self.prefetch_check)
        prefetch_row.addStretch(1)
        prefetch_row.addWidget(self.prefetch_label)
        self.hint_label = QLabel("")
        self.hint_label.setWordWrap(True)
        self.hint_label.setVisible(False)  # shown only while it says something: the dock is tight
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.shortcuts_label = QLabel(
            "<b>Keys</b> (prompt layers selected): "
            + " · ".join(f"<b>{k}</b> {SHORT_NAMES.get(k, v)}" for k, v in SHORTCUTS))
        self.shortcuts_label.setWordWrap(True)
        self.shortcuts_label.setTextFormat(Qt.TextFormat.RichText)
        self.shortcuts_label.setToolTip("\n".join(f"{k}: {v}" for k, v in SHORTCUTS))

        layout = QVBoxLayout(self)
        layout.addLayout(lform)
        layout.addWidget(self.class_box)
        layout.addLayout(grid)
        layout.addLayout(prefetch_row)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.hint_label)
        layout.addWidget(self.status_label)
        layout.addWidget(self.shortcuts_label)
        layout.addStretch(1)

        # -- wiring
        self.class_box.changed.connect(self._apply_class_colours)
        self.class_box.hint.connect(self._hint)
        self.points_button.clicked.connect(self.activate_points)
        self.box_button.clicked.connect(self.activate_box)
        self.negative_button.toggled.connect(self._on_negative_toggled)
        self.commit_button.clicked.connect(self.commit)
        self.propagate_button.clicked.connect(self.propagate)
        self.clear_button.clicked.connect(self.clear_slice)
        self.undo_button.clicked.connect(self.undo)
        self.cancel_button.clicked.connect(self._on_cancel)
        self.prefetch_check.toggled.connect(self._on_prefetch_toggled)
        self.image_combo.layer_changed.connect(self._on_image_changed)
        self.labels_combo.layer_changed.connect(self._on_labels_changed)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self._on_view_changed)
        self.viewer.dims.events.order.connect(self._on_view_changed)
        self.viewer.dims.events.ndisplay.connect(self._on_view_changed)
        self.session.model_changed.connect(self._on_model_changed)
        self.session.embeddings_changed.connect(self._on_embeddings_changed)
        self._apply_class_colours()
        self._on_image_changed(self.image_combo.layer)

    # ---- public state ----------------------------------------------------------------------------
    @property
    def edits(self) -> Any:
        """The session's :class:`~napari_medsam.app.bookkeeping.EditLog` (Undo, committed slices)."""
        return self.session.edits

    @property
    def image_layer(self) -> Any:
        return self.image_combo.layer

    @property
    def labels_layer(self) -> Any:
        return self.labels_combo.layer

    @property
    def classes(self) -> list[_layers.LabelClass]:
        return self.class_box.classes

    @property
    def current_class(self) -> _layers.LabelClass:
        return self.class_box.current

    def prompt_layers(self, create: bool = True) -> tuple[Any, Any]:
        """The Points and Shapes layers of the selected image (made again if the user deleted them)."""
        image = self.image_layer
        if image is None:
            return None, None
        pts, shp = self._prompt_layers.get(id(image), (None, None))
        if not create:
            return (pts if pts in self.viewer.layers else None, shp if shp in self.viewer.layers else None)
        points_kwargs, shapes_kwargs = _layers.prompt_layers_kwargs(image)
        if shp is None or shp not in self.viewer.layers:
            shp = self.viewer.add_shapes(**shapes_kwargs)
            shp.events.data.connect(self._on_prompts_changed)
            self._bind_keys(shp)
        if pts is None or pts not in self.viewer.layers:
            pts = self.viewer.add_points(**points_kwargs)
            pts.feature_defaults = {_layers.POSITIVE: not self._negative}
            pts.events.data.connect(self._on_prompts_changed)
            pts.mouse_drag_callbacks.insert(0, self._on_points_press)
            self._bind_keys(pts)
            pts.mode = "add"
        self._prompt_layers[id(image)] = (pts, shp)
        return pts, shp

    # ---- classes ------------------------------------------------------------------------------------
    def set_classes(self, classes: list[_layers.LabelClass]) -> None:
        self.class_box.set_classes(classes)

    def select_class(self, index: int) -> None:
        self.class_box.select(index)

    def _apply_class_colours(self) -> None:
        self.session.class_names = {c.label_id: c.name for c in self.classes}
        labels = self.labels_layer
        if labels is not None:
            if _layers.is_ours(labels):
                labels.colormap = _layers.class_colormap(self.classes)
            labels.selected_label = self.current_class.label_id
        if self._preview is not None and self._preview in self.viewer.layers:
            c = self.current_class
            self._preview.colormap = _layers.class_colormap([_layers.LabelClass(c.name, c.color, 1)])

    # ---- layers -------------------------------------------------------------------------------------
    def _accept_labels(self, layer: Any) -> bool:
        from napari.layers import Labels

        image = self.image_layer if hasattr(self, "image_combo") else None
        return (isinstance(layer, Labels) and layer is not self._preview and not _layers.is_preview(layer)
                and image is not None and _layers.fits(layer, image))

    def _on_image_changed(self, image: Any) -> None:
        self._cancel_preview()
        self._clear_preview()
        if self._watched_image is not None:
            with contextlib.suppress(RuntimeError, TypeError, ValueError):
                self._watched_image.events.data.disconnect(self._on_image_data)
        self._watched_image = image
        for pid, (pts, shp) in self._prompt_layers.items():  # show only the selected image's prompts
            for ly in (pts, shp):
                if ly is not None and ly in self.viewer.layers:
                    ly.visible = image is not None and pid == id(image)
        self.labels_combo.refresh()
        if image is not None:
            image.events.data.connect(self._on_image_data)
            self.prompt_layers(create=True)
            if self._box_preferred():
                self.activate_box()
            else:
                self.activate_points()
        self._follow_prefetch()
        self._update_status()

    def _on_image_data(self, event: Any = None) -> None:
        """The image's data were replaced: its old embeddings and preview no longer apply."""
        self._cancel_preview()
        self._clear_preview()
        self.labels_combo.refresh()
        self._follow_prefetch()
        self._schedule_preview()

    def _on_labels_changed(self, labels: Any) -> None:
        self._apply_class_colours()

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        if layer is self._preview:
            self._preview = None
            self._preview_view = None
            self._last = None
        removed = self._prompt_layers.pop(id(layer), None)
        if removed is not None:  # an image went: its prompt layers, preview and encoders go too
            self.session.forget_image(id(layer))
            prev = self._preview
            if prev is not None and _layers.is_preview(prev, of=layer):
                removed = (*removed, prev)
            for ly in removed:
                if ly is not None and ly in self.viewer.layers:
                    self.viewer.layers.remove(ly)
        self.edits.forget(layer)

    def _target_labels(self) -> Any:
        """The Labels layer to write into; a new one for the image when none is selected."""
        labels = self.labels_layer
        image = self.image_layer
        if labels is not None and labels in self.viewer.layers:
            return labels
        if image is None:
            return None
        labels = self.viewer.add_labels(**_layers.new_labels_kwargs(image))
        labels.colormap = _layers.class_colormap(self.classes)
        self._bind_keys(labels)
        self.labels_combo.refresh()
        self.labels_combo.set_layer(labels)
        self._reselect_prompt_layer()
        return labels

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

    def _reselect_prompt_layer(self) -> None:
        pts, shp = self.prompt_layers(create=False)
        active = self.viewer.layers.selection.active
        if active not in (pts, shp):
            target = shp if self._box_preferred() and shp is not None else pts
            if target is not None:
                self.viewer.layers.selection.active = target

    def _bind_keys(self, layer: Any) -> None:
        bindings = {
            "C": lambda _ly: self.commit(),
            "G": lambda _ly: self.propagate(),
            "Q": lambda _ly: self.clear_slice(),
            "Shift-Q": lambda _ly: self.clear_all(),
            "U": lambda _ly: self.undo(),
            "N": lambda _ly: self.negative_button.toggle(),
        }
        for key, fn in bindings.items():
            layer.bind_key(key, fn, overwrite=True)

    # ---- prompt modes -------------------------------------------------------------------------------
    def _box_preferred(self) -> bool:
        from ..core.registry import get_spec

        loaded = self.session.loaded
        spec = loaded.spec if loaded is not None else get_spec(DEFAULT_MODEL)
        return spec.box_preferred

    def activate_points(self) -> None:
        pts, _ = self.prompt_layers()
        if pts is not None:
            self.viewer.layers.selection.active = pts
            pts.mode = "add"

    def activate_box(self) -> None:
        _, shp = self.prompt_layers()
        if shp is not None:
            self.viewer.layers.selection.active = shp
            shp.mode = "add_rectangle"

    def _on_negative_toggled(self, checked: bool) -> None:
        self._negative = bool(checked)
        pts, _ = self.prompt_layers(create=False)
        if pts is not None:
            pts.feature_defaults = {_layers.POSITIVE: not self._negative}

    def _on_points_press(self, layer: Any, event: Any) -> None:
        """Shift+click adds a negative point (or a positive one while negative clicks are on)."""
        if layer.mode != "add":
            return
        shift = "Shift" in [str(m) for m in getattr(event, "modifiers", ())]
        layer.feature_defaults = {_layers.POSITIVE: not (self._negative ^ shift)}

    # ---- preview ------------------------------------------------------------------------------------
    def _on_prompts_changed(self, event: Any = None) -> None:
        if _action(event) in _TRANSIENT:
            return
        if self._prompt_time is None:
            self._prompt_time = time.perf_counter()
        self._schedule_preview()

    def _on_view_changed(self, event: Any = None) -> None:
        self._follow_prefetch()
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
        if not self.preview_in_worker:  # benchmarks only: the same work, blocking the main thread
            from ..core.progress import drain

            self._preview_job = None
            self._on_preview_result(tag, view, drain(self.session.preview_steps(req, view.index, prompt)))
            return
        self.prefetch.hold()  # the decoder gets the cores; released in _on_preview_finished
        self._preview_job = _workers.start(
            lambda cancel: self.session.preview_steps(req, view.index, prompt), desc="MedSAM preview",
            cancelable=False, on_returned=lambda res: self._on_preview_result(tag, view, res),
            on_finished=self._on_preview_finished)

    def _on_preview_result(self, tag: tuple, view: _layers.SliceView, res: Any) -> None:
        snap = self._snapshot()
        if snap is None or snap[4] != tag:
            self._preview_dirty = True  # the prompt or the slice changed meanwhile: run again
            return
        if self.image_layer is None:
            return
        self._draw_preview(res.mask, view)  # may replace the preview layer (which resets _last)
        self._last = (tag, res)
        if self._prompt_time is not None:
            self.latencies.append(time.perf_counter() - self._prompt_time)
            job = self._preview_job
            self.compute_times.append(float(job.last.info.get("seconds", float("nan")))
                                      if job is not None and job.last is not None else float("nan"))
            self._prompt_time = None
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
        pts, shp = self.prompt_layers(create=False)
        self._cancel_preview()
        _layers.remove_prompts(pts, shp, image, view)
        self._clear_preview()
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
        labels = self.labels_layer
        cls = self.current_class
        pts, shp = self.prompt_layers(create=False)
        prompts = _layers.layer_prompts(pts, shp, image, view)
        seeds, committed = self.session.seeds(cls.label_id, view, target=labels, prompts=prompts)
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

        def returned(masks: dict) -> None:
            self._on_propagated(image_ref, labels_ref, view, cls, masks, committed)

        self.propagate_job = self.session.hold_cpu(_workers.start(  # prefetching waits meanwhile
            lambda cancel: self.session.propagate_steps(req, seeds, cancel=cancel),
            desc=f"Propagating {cls.name}", on_progress=self._on_job_progress, on_returned=returned,
            on_finished=self._on_propagate_finished, show_bar=self.session.napari_progress))

    def _on_job_progress(self, p: Any) -> None:
        _workers.show_progress(self.progress_bar, p)

    def _on_propagated(self, image_ref: Any, labels_ref: Any, view: _layers.SliceView, cls: _layers.LabelClass,
                       masks: dict, committed: set[int]) -> None:
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
        edit = self.session.write_masks(labels, view, masks, cls.label_id, keep=sorted(committed),
                                        description=f"propagate {cls.name}")
        pts, shp = self.prompt_layers(create=False)
        if self.image_layer is image:
            _layers.remove_prompts(pts, shp, image, None)
            self._clear_preview()
        span = f"slices {min(masks)}-{max(masks)}" if masks else "no slice"
        n = 0 if edit is None else edit.n_voxels
        self.status_label.setText(f"Propagated {cls.name} over {len(masks)} slices ({span}): {n} voxels written.")
        self.session.embeddings_changed.emit(id(image))

    def _on_propagate_finished(self, job: _workers.Job) -> None:
        self.progress_bar.setVisible(False)
        self.cancel_button.setEnabled(False)
        self.propagate_button.setEnabled(True)
        if job.cancelled:
            self.status_label.setText("Propagation cancelled; nothing was written.")

    def _on_cancel(self) -> None:
        if self.propagate_job is not None:
            self.propagate_job.cancel()

    def clear_slice(self) -> None:
        """Remove the prompts on the slice under view and the preview."""
        image = self.image_layer
        view = _layers.current_slice(self.viewer.dims, image) if image is not None else None
        if view is None:
            return
        pts, shp = self.prompt_layers(create=False)
        self._cancel_preview()
        _layers.remove_prompts(pts, shp, image, view)
        self._clear_preview()

    def clear_all(self) -> None:
        """Remove every prompt of the selected image and the preview."""
        image = self.image_layer
        if image is None:
            return
        pts, shp = self.prompt_layers(create=False)
        self._cancel_preview()
        _layers.remove_prompts(pts, shp, image, None)
        self._clear_preview()

    def undo(self) -> None:
        """Undo the last commit or propagation (voxels repainted since then are left alone)."""
        edit = self.session.undo(lambda labels: labels in self.viewer.layers)
        self.status_label.setText("Nothing to undo." if edit is None else
                                  f"Undid {edit.description} ({edit.n_voxels} voxels).")

    # ---- status -------------------------------------------------------------------------------------
    def _hint(self, text: str) -> None:
        if text != self.hint_label.text():
            self.hint_label.setText(text)
            self.hint_label.setVisible(bool(text))

    def _update_status(self, iou: float | None = None) -> None:
        image = self.image_layer
        if image is None:
            self.status_label.setText("Open an image (File > Open, or File > Open Sample > MedSAM).")
            return
        if self.session.loaded is None:
            self.status_label.setText(f"No model loaded: the first prompt loads {DEFAULT_MODEL} "
                                      "(or choose one in the Model widget).")
            return
        view = _layers.current_slice(self.viewer.dims, image)
        where = "" if view is None or not view.is_3d else f"slice {view.index} (axis {view.axis}) · "
        extra = "" if iou is None else f"predicted IoU {iou:.2f}"
        if iou is not None and self.latencies:
            extra += f" · {1000 * self.latencies[-1]:.0f} ms"
        if int(self.viewer.dims.ndisplay) == 3:
            extra = "switch to the 2D view to place prompts"
        self.status_label.setText(f"{where}{self.session.loaded.name} · {extra}".rstrip(" ·"))

    # -- cleanup ---------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        self._preview_timer.stop()
        self._prefetch_timer.stop()
        self.prefetch.close()
        for job in (self.propagate_job, self._preview_job):
            if job is not None:
                job.cancel()
        self.image_combo.disconnect_viewer()
        self.labels_combo.disconnect_viewer()
        self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        self.session.embeddings_changed.disconnect(self._on_embeddings_changed)
        self.viewer.dims.events.current_step.disconnect(self._on_view_changed)
        self.viewer.dims.events.order.disconnect(self._on_view_changed)
        self.viewer.dims.events.ndisplay.disconnect(self._on_view_changed)
        self.session.model_changed.disconnect(self._on_model_changed)
        if self._watched_image is not None:
            self._watched_image.events.data.disconnect(self._on_image_data)
