"""Fine-tune dock widget: train a prompt-free head on the slices a user labelled, then segment.

*Train* embeds the labelled slices of the chosen Labels layer (or the slices listed), trains the
chosen head family on them in a thread worker with a progress bar, a live loss curve and Cancel.
*Segment volume* runs the head on every slice and writes the prediction into a NEW Labels layer:
what the user drew is never overwritten. Heads are saved to and loaded from one file each.
The target can also be an adapter (Med-SA or LoRA inside the encoder, :mod:`._adapters`): the
estimated time is shown before its steps start, and the trained adapter is saved and applied.
The maths is :mod:`napari_medsam.core.finetune` and :mod:`napari_medsam.core.infer`.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QFileDialog,
)

from .. import _layers
from ..app.params import parse_slices
from ..app.session import AnnotationSession
from ..core.progress import Progress, ProgressGen
from . import _workers
from ._adapters import FinetuneAdaptersMixin
from ._dock import DockWidget
from ._finetune_controls import build_controls
from ._shared import encoder_request
from .session import session_for

PLOT_INTERVAL = 0.2  # seconds between two repaints of the loss curve and label


def _load_head_steps(path: str, loaded: Any) -> ProgressGen[Any]:
    from ..core.finetune import load_head

    yield Progress(0, 1, "reading head")
    return load_head(path, loaded=loaded)


def _save_head_steps(path: str, head: Any) -> ProgressGen[Any]:
    from ..core.finetune import save_head

    yield Progress(0, 1, "saving head")
    return save_head(path, head)


class FinetuneWidget(FinetuneAdaptersMixin, DockWidget):
    """Train a head (or an adapter) on labelled slices; segment whole volumes into a Labels layer (a
    new one, or the last prediction of the same head kind on the same image if nobody edited it)."""

    def __init__(self, napari_viewer: Any, *, session: AnnotationSession | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer = _layers.unwrap(napari_viewer)
        self.session = session or session_for(napari_viewer)
        self.train_job: _workers.Job | None = None
        self.predict_job: _workers.Job | None = None
        self.io_job: _workers.Job | None = None
        self.prediction_layer: Any = None
        self._prediction_image: Any = None  # weakref to the image the prediction layer predicts
        self._prediction_untouched = False  # ... and nobody has edited that layer since
        self._writing_prediction = False
        self._plot_time = 0.0
        self.estimate_s = float("nan")  # the adapter training time estimated before its steps start
        self.trained_adapter: Any = None
        self.adapter_path: Any = None

        build_controls(self)
        self.head_combo.currentIndexChanged.connect(self._on_target_changed)

        self.train_button.clicked.connect(self.train)
        self.cancel_button.clicked.connect(self.cancel)
        self.save_button.clicked.connect(self._on_save)
        self.load_button.clicked.connect(self._on_load)
        self.segment_button.clicked.connect(self.segment)
        self.image_combo.layer_changed.connect(lambda _ly: self.labels_combo.refresh())
        self.connect_session(self.session.model_changed, self._update_buttons)
        self.connect_session(self.session.head_changed, self._on_head_changed)
        self._update_buttons()

    @property
    def head(self) -> Any:
        """The session's trained or loaded head (None: none yet)."""
        return self.session.head

    @head.setter
    def head(self, head: Any) -> None:
        self.session.set_head(head)

    # ---- helpers ------------------------------------------------------------------------------------
    def _accept_labels(self, layer: Any) -> bool:
        from napari.layers import Labels

        image = self.image_combo.layer if hasattr(self, "image_combo") else None
        return (isinstance(layer, Labels) and not _layers.is_preview(layer) and layer is not self.prediction_layer
                and image is not None and _layers.fits(layer, image))

    def _update_buttons(self, *_: Any) -> None:
        busy = any(j is not None and j.running for j in (self.train_job, self.predict_job))
        self.train_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.segment_button.setEnabled(self.head is not None and not busy)
        self.save_button.setEnabled(self.head is not None)

    def _describe_head(self) -> None:
        h = self.head
        if h is None:
            self.head_label.setText("No head trained or loaded.")
            return
        m = h.meta
        classes = ", ".join(f"{n} ({c})" for c, n in zip(m.class_ids, m.class_names, strict=False))
        hist = m.history or {}
        loss = hist.get("final_loss")
        loss_text = f", final loss {loss:.3f}" if isinstance(loss, (int, float)) else ""
        if hist.get("precision"):
            loss_text += f" ({hist['precision']})"
        self.head_label.setText(f"{m.kind} head on {m.backbone}, axis {m.axis}; classes: {classes}; "
                                f"trained on {len(m.training_slices)} slices{loss_text}.")

    def params(self) -> Any:
        from ..core.finetune import TrainParams

        epochs = int(self.epochs_spin.value())
        return TrainParams(head=str(self.head_combo.currentData()), epochs=epochs or None,
                           seed=int(self.seed_spin.value()))

    # ---- training -----------------------------------------------------------------------------------
    def train(self) -> None:
        if self.train_job is not None and self.train_job.running:
            return
        image, labels = self.image_combo.layer, self.labels_combo.layer
        if image is None or labels is None:
            self.loss_label.setText("Choose an image and a Labels layer drawn on it.")
            return
        if self.session.loaded is None:
            self.loss_label.setText("Load a model in the Model widget first.")
            return
        try:
            slices = parse_slices(self.slices_edit.text()) if self.some_slices.isChecked() else None
        except ValueError as e:
            self.loss_label.setText(f"Slices: {e}")
            return
        if self.adapter_kind() is not None:
            self._train_adapter(image, labels, slices)
            return
        req = encoder_request(image, self.viewer, self.session)
        if req is None:
            return
        snapshot = np.array(labels.data, copy=True)  # the user may keep painting while it trains
        params = self.params()
        names = dict(self.session.class_names)
        self.loss_plot.clear()
        self._plot_time = 0.0
        _workers.show_progress(self.progress_bar)
        self.loss_label.setText("Embedding the training slices…")
        self.train_job = self.session.hold_cpu(_workers.start(  # background prefetching waits meanwhile
            lambda cancel: self.session.train_head_steps(req, snapshot, slices, params, class_names=names,
                                                         cancel=cancel),
            desc=f"Training a {params.head} head", on_progress=self._on_train_progress,
            on_returned=self._on_trained, on_finished=self._on_job_finished, show_bar=self.session.napari_progress))
        self._update_buttons()

    def _on_train_progress(self, p: Progress) -> None:
        loss = p.info.get("loss")
        if loss is not None:
            self.loss_plot.values.append(float(loss))
        now = time.perf_counter()
        if now - self._plot_time < PLOT_INTERVAL and not (p.total and p.step >= p.total):
            return  # repaint at most every PLOT_INTERVAL: steps of a small head take milliseconds
        self._plot_time = now
        _workers.show_progress(self.progress_bar, p)
        if loss is not None:
            self.loss_plot.update()
            smooth = self.loss_plot.current()  # the curve's value, not one noisy step
            self.loss_label.setText(f"epoch {p.info.get('epoch')} · step {p.step}/{p.total} · loss {smooth:.4f}")
        elif p.message:
            self.loss_label.setText(f"{p.message}: {p.step}/{p.total}" if p.total else f"{p.message}…")

    def _on_trained(self, head: Any) -> None:
        self.head = head  # the session keeps it; head_changed describes it
        hist = head.meta.history or {}
        self.loss_plot.set_final(hist.get("final_loss"))  # the plot then says what the Head box says
        self.loss_label.setText(f"Trained in {hist.get('seconds', 0):.1f} s, {hist.get('epochs', '?')} epochs "
                                f"(stopped: {hist.get('stopped', '?')}; {hist.get('precision', 'fp32')}).")

    def _on_job_finished(self, job: _workers.Job) -> None:
        self.progress_bar.setVisible(False)
        if job.cancelled:
            self.loss_label.setText(f"{job.desc}: cancelled; nothing was kept.")
        self._update_buttons()

    def cancel(self) -> None:
        for job in (self.train_job, self.predict_job):
            if job is not None and job.running:
                job.cancel()

    # ---- prediction ---------------------------------------------------------------------------------
    def segment(self) -> None:
        if self.head is None or (self.predict_job is not None and self.predict_job.running):
            return
        image = self.image_combo.layer
        if image is None:
            return
        if self.session.loaded is None:
            self.loss_label.setText(f"Load {self.head.meta.backbone} in the Model widget first.")
            return
        volume = _layers.image_volume(image)
        head = self.head
        image_ref = image
        _workers.show_progress(self.progress_bar)
        self.predict_job = self.session.hold_cpu(_workers.start(
            lambda cancel: self.session.predict_steps(volume, head, cancel=cancel), desc="Segmenting the volume",
            on_progress=self._on_predict_progress, on_returned=lambda res: self._on_predicted(image_ref, res),
            on_finished=self._on_job_finished, show_bar=self.session.napari_progress))
        self._update_buttons()

    def _on_predict_progress(self, p: Progress) -> None:
        _workers.show_progress(self.progress_bar, p)
        if p.total:
            self.loss_label.setText(f"Segmenting: {p.step}/{p.total} slices")

    def _on_predicted(self, image: Any, result: Any) -> None:
        if image not in self.viewer.layers:
            self.loss_label.setText("The image was removed while segmenting; nothing was added.")
            return
        name = f"{image.name} {self.head.kind} prediction"
        layer = self._untouched_prediction(image, name, result.labels)
        if layer is not None:
            # a prediction nobody has edited is a proposal: the new one replaces it rather than
            # stacking another layer (and adding a layer stalls the GUI thread ~120-250 ms in napari)
            self._writing_prediction = True
            try:
                data = layer.data
                if isinstance(data, np.ndarray) and data.dtype == result.labels.dtype and data.flags.writeable:
                    np.copyto(data, result.labels)  # in place: no new slicing of the layer, one refresh
                    layer.refresh()
                else:
                    layer.data = result.labels
            finally:
                self._writing_prediction = False
            where = f"layer '{layer.name}' (replacing its unedited earlier prediction)"
        else:
            kwargs = _layers.new_labels_kwargs(image, name=name)
            kwargs["data"] = result.labels
            kwargs["colormap"] = _layers.proposal_colormap()  # never the user's colours; set at once: one refresh
            layer = self.viewer.add_labels(**kwargs)
            self._watch_prediction(layer, image)
            where = f"a new layer '{layer.name}'"
        self.prediction_layer = layer
        n = int(np.count_nonzero(result.labels))
        self.loss_label.setText(f"Segmented {len(result.slices)} slices in {result.seconds:.1f} s "
                                f"({result.precision}) into {where} ({n} voxels labelled).")

    def _watch_prediction(self, layer: Any, image: Any) -> None:
        """Remember which image ``layer`` predicts and mark it edited on the first paint, fill or data
        change that is not ours (an edited prediction is the user's work: never replaced)."""
        self._prediction_image = weakref.ref(image)
        self._prediction_untouched = True

        def touched(_event: Any = None) -> None:
            if not self._writing_prediction and layer is self.prediction_layer:
                self._prediction_untouched = False

        layer.events.paint.connect(touched)
        layer.events.data.connect(touched)

    def _untouched_prediction(self, image: Any, name: str, labels: np.ndarray) -> Any:
        """The last prediction layer if it is still in the viewer, predicts ``image`` under the same
        name (same head kind, not renamed), has the same shape and was never edited; else None."""
        layer = self.prediction_layer
        if layer is None or layer not in self.viewer.layers or layer.name != name or not self._prediction_untouched:
            return None
        of = self._prediction_image() if self._prediction_image is not None else None
        return layer if of is image and tuple(layer.data.shape) == tuple(labels.shape) else None

    # ---- head files ---------------------------------------------------------------------------------
    def save_head(self, path: str) -> None:
        if self.head is None:
            return
        self.io_job = _workers.start(lambda cancel: _save_head_steps(path, self.head), desc="Saving the head",
                                     show_bar=False, cancelable=False,
                                     on_returned=lambda p: self.loss_label.setText(f"Saved the head to {p}."))

    def load_head(self, path: str) -> None:
        loaded = self.session.loaded
        if loaded is None:
            self.loss_label.setText("Load the model the head was trained on first (Model widget).")
            return
        self.io_job = _workers.start(lambda cancel: _load_head_steps(path, loaded), desc="Loading the head",
                                     show_bar=False, cancelable=False, on_returned=self._on_head_loaded)

    def _on_head_loaded(self, head: Any) -> None:
        self.head = head

    def _on_head_changed(self, _head: Any = None) -> None:
        self._describe_head()
        self._update_buttons()

    def _on_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save head", "head.medsam-head.pt", "Head files (*.pt)")
        if path:
            self.save_head(path)

    def _on_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load head", "", "Head files (*.pt);;All files (*)")
        if path:
            self.load_head(path)

    # -- cleanup ---------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        self.cancel()
        self.image_combo.disconnect_viewer()
        self.labels_combo.disconnect_viewer()
        self.disconnect_session()
