"""Fine-tune dock widget: train a prompt-free head on the slices a user labelled, then segment.

*Train* embeds the labelled slices of the chosen Labels layer (or the slices listed), trains the
chosen head family on them in a thread worker with a progress bar, a live loss curve and Cancel.
*Segment volume* runs the head on every slice and writes the prediction into a NEW Labels layer:
what the user drew is never overwritten. Heads are saved to and loaded from one file each.
The maths is :mod:`napari_medsam.core.finetune` and :mod:`napari_medsam.core.infer`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .. import _layers
from ..app.params import head_kinds, parse_slices
from ..app.session import AnnotationSession
from ..core.progress import Progress, ProgressGen
from . import _workers
from ._dock import DockWidget
from ._layer_combo import LayerCombo
from ._shared import encoder_request, is_image
from .session import session_for

PLOT_INTERVAL = 0.2  # seconds between two repaints of the loss curve and label

class LossPlot(QWidget):
    """A minimal live curve of the training loss (no plotting library)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.values: list[float] = []
        self.setMinimumHeight(70)

    def clear(self) -> None:
        self.values = []
        self.update()

    def add(self, value: float) -> None:
        self.values.append(float(value))
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        painter.setPen(QPen(QColor(128, 128, 128), 1))
        painter.drawRect(0, 0, w - 1, h - 1)
        vals = [v for v in self.values if np.isfinite(v)]
        if len(vals) < 2:
            painter.drawText(6, h // 2, "loss")
            return
        lo, hi = min(vals), max(vals)
        span = max(hi - lo, 1e-9)
        n = len(vals)
        poly = QPolygonF([QPointF(3 + (w - 6) * i / (n - 1), 3 + (h - 6) * (1 - (v - lo) / span))
                          for i, v in enumerate(vals)])
        painter.setPen(QPen(QColor(255, 165, 0), 2))
        painter.drawPolyline(poly)
        painter.setPen(QPen(QColor(200, 200, 200), 1))
        painter.drawText(6, 14, f"loss {vals[-1]:.3f}  (min {lo:.3f})")


def _load_head_steps(path: str, loaded: Any) -> ProgressGen[Any]:
    from ..core.finetune import load_head

    yield Progress(0, 1, "reading head")
    return load_head(path, loaded=loaded)


def _save_head_steps(path: str, head: Any) -> ProgressGen[Any]:
    from ..core.finetune import save_head

    yield Progress(0, 1, "saving head")
    return save_head(path, head)


class FinetuneWidget(DockWidget):
    """Train a head on labelled slices; segment whole volumes into a new Labels layer."""

    def __init__(self, napari_viewer: Any, *, session: AnnotationSession | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer = _layers.unwrap(napari_viewer)
        self.session = session or session_for(napari_viewer)
        self.train_job: _workers.Job | None = None
        self.predict_job: _workers.Job | None = None
        self.io_job: _workers.Job | None = None
        self.prediction_layer: Any = None
        self._plot_time = 0.0

        self.image_combo = LayerCombo(napari_viewer, is_image)
        self.labels_combo = LayerCombo(napari_viewer, self._accept_labels)
        self.all_slices = QRadioButton("every slice holding labels")
        self.some_slices = QRadioButton("these slices:")
        self.all_slices.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.all_slices)
        group.addButton(self.some_slices)
        self.slices_edit = QLineEdit()
        self.slices_edit.setPlaceholderText("e.g. 40, 52, 60-64")
        self.head_combo = QComboBox()
        for kind, text in head_kinds().items():
            self.head_combo.addItem(kind, kind)
            self.head_combo.setItemData(self.head_combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole)
        from ..core.finetune import TrainParams

        defaults = TrainParams()
        self.epochs_spin = QSpinBox()  # 0 = "auto": the benchmarked schedule (as many as fit in max_steps)
        self.epochs_spin.setRange(0, 10000)
        self.epochs_spin.setSpecialValueText(f"auto (up to {defaults.max_steps} steps)")
        self.epochs_spin.setValue(defaults.epochs or 0)
        self.epochs_spin.setToolTip("most passes over the labelled slices; auto trains the schedule "
                                    "docs/benchmarks.md measured")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setValue(defaults.seed)
        self.train_button = QPushButton("Train")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        self.loss_label = QLabel("")
        self.loss_plot = LossPlot()
        self.head_label = QLabel("No head trained or loaded.")
        self.head_label.setWordWrap(True)
        self.save_button = QPushButton("Save head…")
        self.load_button = QPushButton("Load head…")
        self.segment_button = QPushButton("Segment volume")

        slices_row = QHBoxLayout()
        slices_row.addWidget(self.some_slices)
        slices_row.addWidget(self.slices_edit)
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Train on", self.all_slices)
        form.addRow("", slices_row)
        form.addRow("Head", self.head_combo)
        form.addRow("Epochs (max)", self.epochs_spin)
        form.addRow("Seed", self.seed_spin)
        train_box = QGroupBox("Train a head")
        tb = QVBoxLayout(train_box)
        tb.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.cancel_button)
        tb.addLayout(buttons)
        tb.addWidget(self.progress_bar)
        tb.addWidget(self.loss_label)
        tb.addWidget(self.loss_plot)
        head_box = QGroupBox("Head")
        hb = QVBoxLayout(head_box)
        hb.addWidget(self.head_label)
        io_row = QHBoxLayout()
        io_row.addWidget(self.save_button)
        io_row.addWidget(self.load_button)
        hb.addLayout(io_row)
        hb.addWidget(self.segment_button)
        layout = QVBoxLayout(self)
        layout.addWidget(train_box)
        layout.addWidget(head_box)
        layout.addStretch(1)

        self.train_button.clicked.connect(self.train)
        self.cancel_button.clicked.connect(self._on_cancel)
        self.save_button.clicked.connect(self._on_save)
        self.load_button.clicked.connect(self._on_load)
        self.segment_button.clicked.connect(self.segment)
        self.image_combo.layer_changed.connect(lambda _ly: self.labels_combo.refresh())
        self.session.model_changed.connect(self._update_buttons)
        self.session.head_changed.connect(self._on_head_changed)
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
            self.loss_label.setText(f"epoch {p.info.get('epoch')} · step {p.step}/{p.total} · loss {loss:.4f}")
        elif p.message:
            self.loss_label.setText(f"{p.message}: {p.step}/{p.total}" if p.total else f"{p.message}…")

    def _on_trained(self, head: Any) -> None:
        self.head = head  # the session keeps it; head_changed describes it
        hist = head.meta.history or {}
        self.loss_label.setText(f"Trained in {hist.get('seconds', 0):.1f} s, {hist.get('epochs', '?')} epochs "
                                f"(stopped: {hist.get('stopped', '?')}).")

    def _on_job_finished(self, job: _workers.Job) -> None:
        self.progress_bar.setVisible(False)
        if job.cancelled:
            self.loss_label.setText(f"{job.desc}: cancelled; nothing was kept.")
        self._update_buttons()

    def _on_cancel(self) -> None:
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
        kwargs = _layers.new_labels_kwargs(image, name=f"{image.name} {self.head.kind} prediction")
        kwargs["data"] = result.labels
        classes = [_layers.LabelClass(n, _layers.DEFAULT_COLORS[(c - 1) % len(_layers.DEFAULT_COLORS)], c)
                   for c, n in zip(result.class_ids, result.class_names, strict=False)]
        layer = self.viewer.add_labels(**kwargs)
        layer.colormap = _layers.class_colormap(classes)
        self.prediction_layer = layer
        n = int(np.count_nonzero(result.labels))
        self.loss_label.setText(f"Segmented {len(result.slices)} slices in {result.seconds:.1f} s into a new "
                                f"layer '{layer.name}' ({n} voxels labelled).")

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
        self._on_cancel()
        self.image_combo.disconnect_viewer()
        self.labels_combo.disconnect_viewer()
        self.session.model_changed.disconnect(self._update_buttons)
        self.session.head_changed.disconnect(self._on_head_changed)
