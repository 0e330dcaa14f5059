"""The Model dock's controls and their layout (no behaviour: the widget wires them)."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..app.params import IntensityChoice, availability, intensity_presets
from ..core.device import DEVICES, PRECISIONS
from ..core.registry import DEFAULT_MODEL, MODELS, list_models
from ._layer_combo import LayerCombo
from ._shared import is_image

INTENSITIES: dict[str, IntensityChoice] = intensity_presets()  # from core.preprocess's presets


def build_controls(w: Any) -> None:
    """Make the dock ``w``'s controls as its attributes and lay them out."""
    w.model_combo = QComboBox()
    for name in list_models(include_test=True):
        ok, _ = availability(name)
        tag = " (test)" if "test" in MODELS[name].tags else ""
        w.model_combo.addItem(f"{'✓' if ok else '✗'} {name}{tag}", name)
    w.model_combo.setCurrentIndex(max(0, w.model_combo.findData(DEFAULT_MODEL)))
    w.model_info = QLabel()
    w.model_info.setWordWrap(True)
    w.model_info.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    w.model_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    w.weights_edit = QLineEdit()
    w.weights_edit.setPlaceholderText("registered weights (or choose a .pth file)")
    w.weights_button = QPushButton("Choose…")
    weights_row = QHBoxLayout()
    weights_row.addWidget(w.weights_edit)
    weights_row.addWidget(w.weights_button)
    w.device_combo = QComboBox()
    w.device_combo.addItems(list(DEVICES))
    w.precision_combo = QComboBox()
    w.precision_combo.addItems(list(PRECISIONS))
    w.load_button = QPushButton("Load")
    w.load_status = QLabel("No model loaded.")
    w.load_status.setWordWrap(True)
    w.load_bar = QProgressBar()
    w.load_bar.setVisible(False)

    run_row = QHBoxLayout()
    run_row.addWidget(w.device_combo)
    run_row.addWidget(QLabel("Precision"))
    run_row.addWidget(w.precision_combo)
    model_row = QHBoxLayout()
    model_row.addWidget(w.model_combo, 1)
    model_row.addWidget(w.load_button)
    # What describes the model and how it runs folds away once a model is loaded.
    w.details_button = QToolButton()
    w.details_button.setCheckable(True)
    w.details_button.setChecked(True)
    w.details_button.setArrowType(Qt.ArrowType.DownArrow)
    w.details_button.setToolTip("show or hide the model's description, weights file, device and precision")
    w.details = QWidget()
    details_form = QFormLayout(w.details)
    details_form.setContentsMargins(0, 0, 0, 0)
    details_form.addRow(w.model_info)
    details_form.addRow("Weights", weights_row)
    details_form.addRow("Device", run_row)
    form = QFormLayout()
    form.addRow("Model", model_row)
    # Adapters: two small buttons on the status line; the line naming the adapter shows only while
    # one is active (no extra row otherwise: the docks must fit a laptop screen)
    w.adapter_label = QLabel("No adapter (the plain model).")
    w.adapter_label.setWordWrap(True)
    w.adapter_label.setVisible(False)
    w.adapter_load_button = QToolButton()
    w.adapter_load_button.setText("Load adapter…")
    w.adapter_load_button.setToolTip("adapters (Med-SA, LoRA) adapt the encoder itself: load a file trained "
                                     "in the Fine-tune dock or by `napari-medsam train --adapter`")
    w.adapter_remove_button = QToolButton()
    w.adapter_remove_button.setText("Remove")
    w.adapter_remove_button.setToolTip("remove the adapter: back to the plain model")
    status_row = QHBoxLayout()
    status_row.addWidget(w.details_button)
    status_row.addWidget(w.load_status, 1)
    status_row.addWidget(w.adapter_load_button)
    status_row.addWidget(w.adapter_remove_button)
    model_box = QGroupBox("Model")
    mb = QVBoxLayout(model_box)
    mb.addLayout(form)
    mb.addWidget(w.details)
    mb.addWidget(w.load_bar)
    mb.addLayout(status_row)
    mb.addWidget(w.adapter_label)

    # -- embeddings group
    w.image_combo = LayerCombo(w.viewer, is_image)
    w.intensity_combo = QComboBox()
    w.intensity_combo.addItems(list(INTENSITIES))
    w.intensity_combo.setToolTip("how raw intensities map to the model's input; auto: a CT soft-tissue "
                                    "window for Hounsfield data, else MR percentile clipping (uint8 and RGB "
                                    "data pass through)")
    w.cache_label = QLabel("")
    w.cache_label.setWordWrap(True)
    w.embed_button = QPushButton("Embed image")
    w.cancel_button = QPushButton("Cancel")
    w.cancel_button.setEnabled(False)
    w.embed_bar = QProgressBar()
    w.embed_bar.setVisible(False)
    w.embed_bar.setFormat("%v / %m slices embedded")
    w.napari_bar_check = QCheckBox("also show progress in napari's activity panel")
    w.napari_bar_check.setToolTip("napari's animated activity indicator slows the window down with "
                                     "software OpenGL (remote desktops, VMs); off by default")
    buttons = QHBoxLayout()
    buttons.addWidget(w.embed_button)
    buttons.addWidget(w.cancel_button)
    eform = QFormLayout()
    eform.addRow("Image", w.image_combo)
    eform.addRow("Intensity", w.intensity_combo)
    emb_box = QGroupBox("Embeddings")
    eb = QVBoxLayout(emb_box)
    eb.addLayout(eform)
    eb.addLayout(buttons)
    eb.addWidget(w.embed_bar)
    eb.addWidget(w.cache_label)
    eb.addWidget(w.napari_bar_check)

    layout = QVBoxLayout(w)
    layout.addWidget(model_box)
    layout.addWidget(emb_box)
    layout.addStretch(1)
