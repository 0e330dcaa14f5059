"""Model & embeddings dock widget: choose and load a model, precompute an image's embeddings.

Opening this widget imports neither torch nor the networks: the model list comes from the registry
and the weights' availability from the file system. The active adapter (if any) is named, with
*Load adapter…* and *Remove* (:mod:`._adapters`). Pressing *Load* loads the model in a thread
worker; *Embed image* embeds every slice (the slice under view first) with a napari progress bar
and a Cancel button. What is cached is shown for the selected image.
"""

from __future__ import annotations

import contextlib
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFileDialog,
)

from .. import _layers
from ..app.params import ModelChoice, availability
from ..app.session import AnnotationSession, EncoderRequest
from ..core.registry import get_spec
from . import _workers
from ._adapters import ModelAdaptersMixin
from ._dock import DockWidget, fit_dock_height
from ._model_controls import INTENSITIES, build_controls
from ._shared import encoder_request, load_model_job
from .session import session_for


class ModelWidget(ModelAdaptersMixin, DockWidget):
    """Choose, load and inspect a model; precompute embeddings of an image."""

    def __init__(self, napari_viewer: Any, *, session: AnnotationSession | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer = _layers.unwrap(napari_viewer)
        self.session = session or session_for(napari_viewer)
        self.load_job: _workers.Job | None = None
        self.embed_job: _workers.Job | None = None
        self.status_job: _workers.Job | None = None
        self.adapter_job: _workers.Job | None = None
        self._status_key: tuple | None = None  # what the cache line counts (image, axis, intensity, model)
        self._status_again = False
        self._current_index = 0
        self._after_load: Any = None

        # -- model group
        build_controls(self)

        # -- wiring
        self.model_combo.currentIndexChanged.connect(self._on_model_selected)
        self.details_button.toggled.connect(self._show_details)
        self.weights_button.clicked.connect(self._on_choose_weights)
        self.weights_edit.textChanged.connect(self._on_weights_text)
        self.load_button.clicked.connect(lambda *_: self.load())
        self.adapter_load_button.clicked.connect(self._on_choose_adapter)
        self.adapter_remove_button.clicked.connect(self.remove_adapter)
        self.embed_button.clicked.connect(lambda *_: self.embed())
        self.cancel_button.clicked.connect(self.cancel)
        self.intensity_combo.currentIndexChanged.connect(self._on_intensity)
        self.napari_bar_check.toggled.connect(self._on_napari_bar)
        self.image_combo.layer_changed.connect(self._on_image_changed)
        self.connect_session(self.session.model_changed, self._on_model_changed)
        self.connect_session(self.session.embeddings_changed, self._on_embeddings_changed)
        self.viewer.dims.events.current_step.connect(self._on_dims)
        self.viewer.dims.events.order.connect(self._on_image_changed)
        self._on_model_selected()
        self._on_model_changed(self.session.loaded)

    # -- model ----------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return str(self.model_combo.currentData())

    def select_model(self, name: str) -> None:
        self.model_combo.setCurrentIndex(self.model_combo.findData(name))

    def _on_model_selected(self, *_: Any) -> None:
        name = self.model_name
        spec = get_spec(name)
        ok, where = availability(name)
        prompts = ", ".join(spec.prompts)
        lines = [spec.description, f"Trained with: {prompts}. Weights {where}."]
        if spec.box_preferred:
            lines.append("Boxes are the reliable prompt for this model; points are experimental.")
        self.model_info.setText("\n".join(lines))
        missing = not ok
        self.weights_button.setText("Choose weights file…" if missing else "Choose…")
        self.load_button.setEnabled(not missing or bool(self.weights_edit.text().strip()))

    def _show_details(self, shown: bool) -> None:
        self.details.setVisible(bool(shown))
        self.details_button.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)
        fit_dock_height(self)

    def _on_weights_text(self, text: str) -> None:
        ok, _ = availability(self.model_name)
        self.load_button.setEnabled(ok or bool(text.strip()))

    def _on_choose_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, f"Weights for {self.model_name}", "",
                                              "PyTorch checkpoints (*.pth *.pt *.bin);;All files (*)")
        if path:
            self.weights_edit.setText(path)

    def choice(self) -> ModelChoice:
        weights = self.weights_edit.text().strip() or None
        return ModelChoice(name=self.model_name, weights=weights, device=self.device_combo.currentText(),
                           precision=self.precision_combo.currentText())

    def load(self, then: Any = None) -> _workers.Job | None:
        """Load the chosen model in a thread worker (``then()`` runs once it is loaded); returns the job."""
        if self.load_job is not None and self.load_job.running:
            return
        self._after_load = then
        choice = self.choice()
        self.load_button.setEnabled(False)
        _workers.show_progress(self.load_bar)
        self.load_status.setText(f"Loading {choice.name}…")
        self.load_job = load_model_job(self.session, choice, on_progress=self._on_load_progress,
                                       on_done=self._on_load_done)
        return self.load_job

    def _on_load_progress(self, p: Any) -> None:
        _workers.show_progress(self.load_bar, p)
        if p.message:
            self.load_status.setText(p.message + "…")

    def _on_load_done(self, job: _workers.Job) -> None:
        self.load_bar.setVisible(False)
        self.load_button.setEnabled(True)
        if self.session.loaded is None or job.cancelled:
            self.load_status.setText("No model loaded (see the notification).")
            return
        self._on_model_changed(self.session.loaded)
        self.details_button.setChecked(False)  # fold the details away: the embedding part matters now
        then, self._after_load = self._after_load, None
        if then is not None:
            then()

    def _on_model_changed(self, loaded: Any) -> None:
        if loaded is None:
            self.load_status.setText("No model loaded.")
        else:
            dtype = "fp32" if loaded.dtype is None else str(loaded.dtype).replace("torch.", "")
            self.load_status.setText(f"Loaded {loaded.name} on {loaded.device} ({dtype}); "
                                     f"weights {loaded.weights_hash[:12]}")
        self._show_adapter(loaded)
        self._refresh_cache_status()

    # -- embeddings -----------------------------------------------------------------------------------
    def request(self) -> EncoderRequest | None:
        return encoder_request(self.image_combo.layer, self.viewer, self.session)

    def _on_napari_bar(self, checked: bool) -> None:
        self.session.napari_progress = bool(checked)

    def _on_intensity(self, *_: Any) -> None:
        self.session.intensity = INTENSITIES[self.intensity_combo.currentText()]
        self._refresh_cache_status()
        layer = self.image_combo.layer
        if layer is not None:  # other embeddings now apply to this image (e.g. the prefetcher's)
            self.session.embeddings_changed.emit(id(layer))

    def _on_image_changed(self, *_: Any) -> None:
        self._on_dims()
        self._refresh_cache_status()

    def _on_dims(self, *_: Any) -> None:
        layer = self.image_combo.layer
        if layer is None:
            return
        view = _layers.current_slice(self.viewer.dims, layer)
        if view is not None:
            self._current_index = view.index

    def _on_embeddings_changed(self, image_id: Any) -> None:
        layer = self.image_combo.layer
        if layer is not None and image_id == id(layer) and not (self.embed_job and self.embed_job.running):
            self._refresh_cache_status()

    def _refresh_cache_status(self) -> None:
        req = self.request()
        if req is None:
            self.cache_label.setText("No 2D or 3D image layer open.")
            self.embed_button.setEnabled(False)
            return
        self.embed_button.setEnabled(not (self.embed_job and self.embed_job.running))
        if self.session.loaded is None:
            self.cache_label.setText("Load a model to see what is cached.")
            return
        if self.status_job is not None and self.status_job.running:
            self._status_again = True  # counted again when the running count ends
            return
        key = (req.key, self.session.loaded.name)
        if key != self._status_key:  # a count for another image / model / axis: say it is coming
            self.cache_label.setText("Checking the cache…")
        self._status_key, self._status_again = key, False  # else the previous count stays until the new one
        self.status_job = _workers.start(lambda cancel: self.session.status_steps(req), desc="cache status",
                                         show_bar=False, on_returned=self._show_status,
                                         on_finished=self._on_status_finished)

    def _on_status_finished(self, _job: Any = None) -> None:
        if self._status_again and self.session.loaded is not None:
            with contextlib.suppress(RuntimeError):  # the viewer closed (widgets deleted) meanwhile
                self._refresh_cache_status()

    def _show_status(self, status: dict) -> None:
        with contextlib.suppress(RuntimeError):  # the viewer closed (widgets deleted) while counting
            self._write_status(status)

    def _write_status(self, status: dict) -> None:
        layer = self.image_combo.layer
        if layer is None or status.get("image_id") != id(layer):
            return
        req = self.request()
        axis = "" if req is None or req.volume.spatial_ndim == 2 else f" along axis {req.axis}"
        self.cache_label.setText(f"{status['cached']} / {status['n_slices']} slices cached{axis} "
                                 f"for {self.session.loaded.name if self.session.loaded else '?'}.")

    def embed(self) -> _workers.Job | None:
        """Embed every slice of the chosen image (the slice under view first) in a thread worker,
        loading the model first if none is; returns the job (None: nothing to embed)."""
        if self.embed_job is not None and self.embed_job.running:
            return self.embed_job
        req = self.request()
        if req is None:
            return None
        if self.session.loaded is None:
            # Load first, then embed: the same button press, no second click needed.
            self.load(then=self.embed)
            return None
        self._on_dims()
        self.embed_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.cache_label.setText(f"Embedding {req.name}, the slice under view first…")
        _workers.show_progress(self.embed_bar)
        self.embed_job = self.session.hold_cpu(_workers.start(  # background prefetching waits meanwhile
            lambda cancel: self.session.embed_steps(req, lambda: self._current_index, cancel=cancel),
            desc=f"Embedding {req.name}", on_progress=self._on_embed_progress, on_finished=self._on_embed_done,
            show_bar=self.session.napari_progress))
        return self.embed_job

    def _on_embed_progress(self, p: Any) -> None:
        # Only the bar changes while embedding: a label's new text re-lays out the dock, which costs
        # the main thread tens of milliseconds with software OpenGL.
        _workers.show_progress(self.embed_bar, p)

    def _on_embed_done(self, job: _workers.Job) -> None:
        self.embed_bar.setVisible(False)
        self.cancel_button.setEnabled(False)
        self.embed_button.setEnabled(True)
        if job.last is not None and job.last.total:
            self.session.embeddings_changed.emit(job.last.info.get("image_id"))
        self._refresh_cache_status()

    def cancel(self) -> None:
        if self.embed_job is not None:
            self.embed_job.cancel()

    # -- cleanup ---------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        self._status_again = False
        for job in (self.embed_job, self.load_job):
            if job is not None:
                job.cancel()
        self.image_combo.disconnect_viewer()
        self.disconnect_session()
        self.viewer.dims.events.current_step.disconnect(self._on_dims)
        self.viewer.dims.events.order.disconnect(self._on_image_changed)
