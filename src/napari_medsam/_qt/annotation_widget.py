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
from typing import Any

from qtpy.QtCore import QTimer, Signal

from .. import _layers, _orientation
from ..app.session import AnnotationSession
from ..core.registry import DEFAULT_MODEL
from ..core.zoom import DEFAULT_CONTEXT
from . import _workers
from ._annotate_controls import SHORT_NAMES, SHORTCUTS, build_controls  # noqa: F401 - public names
from ._annotate_edits import EditsMixin
from ._annotate_preview import PreviewMixin
from ._annotate_prompts import PromptsMixin
from ._dock import DockWidget
from ._prefetch import SlicePrefetch
from .session import session_for


class AnnotationWidget(PromptsMixin, PreviewMixin, EditsMixin, DockWidget):
    """Prompted segmentation of the selected image into a Labels layer, class by class."""

    #: a preview reached the screen: (seconds from the prompt change, seconds the model took);
    #: benchmarks and tests subscribe to it (benchmarks/bench_gui.py)
    preview_shown = Signal(float, float)
    #: a zoomed preview replaced the quick one: (seconds from the prompt change, seconds of the
    #: window's encoder call and its decode)
    zoom_shown = Signal(float, float)

    def __init__(self, napari_viewer: Any, *, session: AnnotationSession | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer = _layers.unwrap(napari_viewer)
        self.session = session or session_for(napari_viewer)
        self._prompt_layers: dict[int, tuple[Any, Any]] = {}
        self._preview: Any = None
        self._preview_view: _layers.SliceView | None = None
        self._last: tuple[tuple, Any] | None = None  # (tag, MaskResult): the preview on screen Commit writes
        # zoom (see _annotate_preview): the quick preview on screen while its zoomed one is computed,
        # the prompt that zoomed one is for, the refine worker, and the status line's note
        self._quick: tuple[tuple, Any] | None = None
        self._refine_tag: tuple | None = None
        self._refine_job: _workers.Job | None = None
        self._refine_dirty = False
        self._refine_prompt_time: float | None = None
        self._zoom_note = ""
        self._zoom_context: float = self.session.zoom if self.session.zoom is not None else DEFAULT_CONTEXT
        self.zooms_shown = 0  # zoomed previews drawn since the dock opened
        self.last_zoom_latency: float | None = None  # seconds from the prompt change to its zoomed preview
        self._preview_job: _workers.Job | None = None
        self._preview_dirty = False
        self._prompt_time: float | None = None
        self._commit_pending = False
        self._negative = False
        self._watched_image: Any = None
        self.load_job: _workers.Job | None = None
        self.propagate_job: _workers.Job | None = None
        self.previews_shown = 0  # previews drawn since the dock opened
        self.last_latency: float | None = None  # seconds from the last prompt change to its preview on screen
        self.preview_in_worker = True  # False decodes on the main thread (benchmarks/bench_gui.py compares)
        #: a prompt on a slice already embedded decodes on the main thread (no worker start, no result
        #: hand-back, one paint for the prompt and its mask instead of two) while the last decode there
        #: took at most this long (s), the main thread's stall budget; a slower one sends the next to a
        #: worker. None: always in a worker.
        self.inline_preview_s: float | None = 0.1
        self._decode_s: float | None = None  # the last main-thread decode (s); None: none yet
        self._drawing = False  # a prompt is being drawn: the prefetcher is held (_hold_while_drawing)
        self.drawing_hold_s = 5.0  # ... at most this long without the prompt's final event
        self.hold_while_drawing = True  # False: the prefetcher runs on until the prompt is final (bench A/B)
        self._drawing_timer = QTimer(self)
        self._drawing_timer.setSingleShot(True)
        self._drawing_timer.timeout.connect(self._end_drawing)
        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(15)
        self._preview_timer.timeout.connect(self._run_preview)
        self.prefetch = SlicePrefetch(self.session)
        self._prefetch_timer = QTimer(self)  # refreshes the "n / m ready" line while prefetching
        self._prefetch_timer.setInterval(400)
        self._prefetch_timer.timeout.connect(self._show_prefetch_status)

        build_controls(self)

        # -- wiring
        self.class_box.changed.connect(self._apply_class_colours)
        self.class_box.hint.connect(self._hint)
        self.points_button.clicked.connect(self.activate_points)
        self.box_button.clicked.connect(self.activate_box)
        self.negative_button.toggled.connect(self._on_negative_toggled)
        self.commit_button.clicked.connect(self.commit)
        self.propagate_button.clicked.connect(self.propagate)
        self.range_from_button.clicked.connect(lambda *_: self.set_range_end("start"))
        self.range_to_button.clicked.connect(lambda *_: self.set_range_end("stop"))
        self.clear_button.clicked.connect(self.clear_slice)
        self.undo_button.clicked.connect(self.undo)
        self.cancel_button.clicked.connect(self.cancel)
        self.prefetch_check.toggled.connect(self._on_prefetch_toggled)
        self.zoom_check.toggled.connect(self._on_zoom_toggled)
        for plane, button in self.plane_buttons.items():
            button.clicked.connect(lambda *_, plane=plane: self.show_plane(plane))
        self.image_combo.layer_changed.connect(self._on_image_changed)
        self.labels_combo.layer_changed.connect(self._on_labels_changed)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self._on_view_changed)
        self.viewer.dims.events.order.connect(self._on_view_changed)
        self.viewer.dims.events.ndisplay.connect(self._on_view_changed)
        self.connect_session(self.session.model_changed, self._on_model_changed)
        self.connect_session(self.session.embeddings_changed, self._on_embeddings_changed)
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
        self._update_planes()
        if image is not None:
            image.events.data.connect(self._on_image_data)
            self.prompt_layers(create=True)
            # the image's preview layer now, with its prompt layers: adding a layer stalls the GUI
            # thread ~120-270 ms in napari, which the first box on the image then no longer waits for
            self._ensure_preview()
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

    # ---- orientation --------------------------------------------------------------------------------
    def show_plane(self, plane: str) -> Any:
        """Show ``plane`` (axial, coronal, sagittal) of the selected image the radiological way; the
        prompts then go on slices along the newly sliced axis. Returns the PlaneView (None: no affine)."""
        image = self.image_layer
        pv = _orientation.show_plane(self.viewer, image, plane) if image is not None else None
        if pv is None:
            self._hint("This image has no anatomical affine (open a NIfTI / DICOM / NRRD scan with the "
                       "napari-medsam reader): change the sliced axis with napari's dims order instead.")
        self._update_status()
        return pv

    def _update_planes(self) -> None:
        image = self.image_layer
        ok = image is not None and _orientation.plane_view(image, "axial", ndim=int(self.viewer.dims.ndim)) is not None
        for button in self.plane_buttons.values():
            button.setEnabled(ok)

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
        where = _orientation.describe_slice(self.viewer.dims, image)  # along the axis the viewer slices now
        where = "" if where in ("", "2D image") else f"{where} · "
        if iou is None and self._last is not None and self._snapshot_tag_matches():
            iou = self._last[1].iou  # the preview on screen is of this slice
        extra = "" if iou is None else f"predicted IoU {iou:.2f}"
        # the latency of what is on screen: the zoomed preview's when it replaced the quick one
        latency = self.last_zoom_latency if self._zoom_note.startswith("zoomed") else self.last_latency
        if iou is not None and latency is not None:
            extra += f" · {1000 * latency:.0f} ms"
        if iou is not None and self._zoom_note:
            extra += f" · {self._zoom_note}"
        if int(self.viewer.dims.ndisplay) == 3:
            extra = "switch to the 2D view to place prompts"
        text = f"{where}{self.session.loaded.name} · {extra}".rstrip(" ·")
        if text != self.status_label.text():  # a new text re-lays out the dock: only on change
            self.status_label.setText(text)

    def _snapshot_tag_matches(self) -> bool:
        view = _layers.current_slice(self.viewer.dims, self.image_layer)
        tag = self._last[0] if self._last is not None else None
        return bool(view is not None and tag is not None and tag[2:4] == (view.axis, view.index))

    # -- cleanup ---------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        self._preview_timer.stop()
        self._prefetch_timer.stop()
        self.prefetch.close()
        for job in (self.propagate_job, self._preview_job, self._refine_job):
            if job is not None:
                job.cancel()
        self.image_combo.disconnect_viewer()
        self.labels_combo.disconnect_viewer()
        self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        self.disconnect_session()
        self.viewer.dims.events.current_step.disconnect(self._on_view_changed)
        self.viewer.dims.events.order.disconnect(self._on_view_changed)
        self.viewer.dims.events.ndisplay.disconnect(self._on_view_changed)
        if self._watched_image is not None:
            self._watched_image.events.data.disconnect(self._on_image_data)
