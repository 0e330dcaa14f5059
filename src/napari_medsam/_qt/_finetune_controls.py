"""The Fine-tune dock's controls and their layout (no behaviour: the widget wires them); defaults
from :class:`~napari_medsam.core.finetune.TrainParams` and the head registry."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QButtonGroup,
    QComboBox,
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
)

from ..app.params import head_kinds
from ._adapters import ADAPTER_TARGETS
from ._layer_combo import LayerCombo
from ._loss_plot import LossPlot
from ._shared import is_image


def build_controls(w: Any) -> None:
    """Make the dock ``w``'s controls as its attributes and lay them out."""
    w.image_combo = LayerCombo(w.viewer, is_image)
    w.labels_combo = LayerCombo(w.viewer, w._accept_labels)
    w.all_slices = QRadioButton("every slice holding labels")
    w.some_slices = QRadioButton("these slices:")
    w.all_slices.setChecked(True)
    group = QButtonGroup(w)
    group.addButton(w.all_slices)
    group.addButton(w.some_slices)
    w.slices_edit = QLineEdit()
    w.slices_edit.setPlaceholderText("e.g. 40, 52, 60-64")
    w.head_combo = QComboBox()
    for kind, text in head_kinds().items():
        w.head_combo.addItem(kind, kind)
        w.head_combo.setItemData(w.head_combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole)
    for target, text in ADAPTER_TARGETS.items():  # adapt the encoder itself (core.adapt), box prompts
        w.head_combo.addItem(text.split(" (")[0], target)
        w.head_combo.setItemData(w.head_combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole)
    from ..core.finetune import TrainParams

    defaults = TrainParams()
    w.epochs_label = QLabel("Epochs (max)")
    w.epochs_spin = QSpinBox()  # 0 = "auto": the benchmarked schedule (as many as fit in max_steps)
    w.epochs_spin.setRange(0, 10000)
    w.epochs_spin.setSpecialValueText(f"auto (up to {defaults.max_steps} steps)")
    w.epochs_spin.setValue(defaults.epochs or 0)
    w.epochs_spin.setToolTip("most passes over the labelled slices; auto trains the schedule "
                                "docs/benchmarks.md measured")
    w.seed_spin = QSpinBox()
    w.seed_spin.setRange(0, 2**31 - 1)
    w.seed_spin.setValue(defaults.seed)
    w.train_button = QPushButton("Train")
    w.cancel_button = QPushButton("Cancel")
    w.cancel_button.setEnabled(False)
    w.progress_bar = QProgressBar()
    w.progress_bar.setVisible(False)
    w.loss_label = QLabel("")
    w.loss_plot = LossPlot()
    w.head_label = QLabel("No head trained or loaded.")
    w.head_label.setWordWrap(True)
    w.save_button = QPushButton("Save head…")
    w.load_button = QPushButton("Load head…")
    w.segment_button = QPushButton("Segment volume")

    slices_row = QHBoxLayout()
    slices_row.addWidget(w.some_slices)
    slices_row.addWidget(w.slices_edit)
    form = QFormLayout()
    form.addRow("Image", w.image_combo)
    form.addRow("Labels", w.labels_combo)
    form.addRow("Train on", w.all_slices)
    form.addRow("", slices_row)
    form.addRow("Train", w.head_combo)
    form.addRow(w.epochs_label, w.epochs_spin)
    form.addRow("Seed", w.seed_spin)
    train_box = QGroupBox("Train a head")
    tb = QVBoxLayout(train_box)
    tb.addLayout(form)
    buttons = QHBoxLayout()
    buttons.addWidget(w.train_button)
    buttons.addWidget(w.cancel_button)
    tb.addLayout(buttons)
    tb.addWidget(w.progress_bar)
    tb.addWidget(w.loss_label)
    tb.addWidget(w.loss_plot)
    head_box = QGroupBox("Head")
    hb = QVBoxLayout(head_box)
    hb.addWidget(w.head_label)
    io_row = QHBoxLayout()
    io_row.addWidget(w.save_button)
    io_row.addWidget(w.load_button)
    hb.addLayout(io_row)
    hb.addWidget(w.segment_button)
    layout = QVBoxLayout(w)
    layout.addWidget(train_box)
    layout.addWidget(head_box)
    layout.addStretch(1)
