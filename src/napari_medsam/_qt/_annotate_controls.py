"""The Annotate dock's controls and their layout (no behaviour: the widget wires them)."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
)

from .._orientation import PLANES
from ._class_table import ClassTable
from ._layer_combo import LayerCombo
from ._shared import is_image

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
_PLANE_SHORT = {"axial": "Ax", "coronal": "Cor", "sagittal": "Sag"}


def _action(event: Any) -> str:
    return str(getattr(event, "action", "") or "")


def build_controls(w: Any) -> None:
    """Make the Annotate dock ``w``'s controls as its attributes and lay them out."""
    # -- layers
    w.image_combo = LayerCombo(w.viewer, is_image)
    w.labels_combo = LayerCombo(w.viewer, w._accept_labels, extra="new labels layer")
    lform = QFormLayout()
    lform.addRow("Image", w.image_combo)
    lform.addRow("Labels", w.labels_combo)

    # -- classes
    w.class_box = ClassTable()
    w.class_table = w.class_box.table

    # -- prompts and actions
    w.points_button = QPushButton("Points (P)")
    w.box_button = QPushButton("Box (R)")
    w.negative_button = QPushButton("Negative clicks (N)")
    w.negative_button.setCheckable(True)
    w.commit_button = QPushButton("Commit (C)")
    w.propagate_button = QPushButton("Propagate (G)")
    w.clear_button = QPushButton("Clear (Q)")
    w.undo_button = QPushButton("Undo (U)")
    w.cancel_button = QPushButton("Cancel")
    w.cancel_button.setEnabled(False)
    grid = QGridLayout()
    grid.addWidget(w.points_button, 0, 0)
    grid.addWidget(w.box_button, 0, 1)
    grid.addWidget(w.negative_button, 0, 2)
    grid.addWidget(w.commit_button, 1, 0)
    grid.addWidget(w.propagate_button, 1, 1)
    grid.addWidget(w.cancel_button, 1, 2)
    grid.addWidget(w.clear_button, 2, 0)
    grid.addWidget(w.undo_button, 2, 1)
    w.progress_bar = QProgressBar()
    w.progress_bar.setVisible(False)
    w.prefetch_check = QCheckBox("Prefetch slices")
    w.prefetch_check.setChecked(w.prefetch.enabled)
    w.prefetch_check.setToolTip("embed the slices around the one under view in the background (at low "
                                   "priority, paused while propagating), so moving to them is instant")
    w.zoom_check = QCheckBox("Zoom in on small objects")
    w.zoom_check.setChecked(w.session.zoom is not None)
    w.zoom_check.setToolTip("A box over a small part of the slice is segmented again on the square around it "
                            "(twice the box's size) at the model's full input: sharper masks of small "
                            "structures. The quick mask shows first, the zoomed one follows and is what "
                            "Commit writes. It costs one more encoder pass per box, as long as embedding a "
                            "slice (under a second with LiteMedSAM on a CPU). Large boxes are never zoomed.")
    w.prefetch_label = QLabel("")
    # Axial / Coronal / Sagittal in the grid's free cell: one click each, no extra row (the dock is tight)
    w.plane_buttons = {}
    plane_row = QHBoxLayout()
    plane_row.setSpacing(2)
    for plane in PLANES:
        b = w.plane_buttons[plane] = QToolButton()
        b.setText(_PLANE_SHORT[plane])
        b.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        b.setToolTip(f"{plane.capitalize()} view: {plane} slices the radiological way (from the scan's "
                     "affine; the array and the exported labels keep their order)")
        plane_row.addWidget(b)
    grid.addLayout(plane_row, 2, 2)
    w.range_edit = QLineEdit()
    w.range_edit.setPlaceholderText("every slice (or e.g. 40:75)")
    w.range_edit.setToolTip("Propagate only within these slices along the sliced axis, both ends included "
                            "(START:STOP, either side may be empty); empty: the whole volume")
    w.range_from_button = QToolButton()
    w.range_from_button.setText("[ here")
    w.range_from_button.setToolTip("Start the range at the slice in view (move the slider, then press)")
    w.range_to_button = QToolButton()
    w.range_to_button.setText("here ]")
    w.range_to_button.setToolTip("End the range at the slice in view (both ends are included)")
    range_row = QHBoxLayout()
    range_row.addWidget(QLabel("Propagate within"))
    range_row.addWidget(w.range_edit, 1)
    range_row.addWidget(w.range_from_button)
    range_row.addWidget(w.range_to_button)
    prefetch_row = QHBoxLayout()  # both switches on one row, their status on the status line: the dock is tight
    prefetch_row.addWidget(w.prefetch_check)
    prefetch_row.addWidget(w.zoom_check)
    prefetch_row.addStretch(1)
    w.hint_label = QLabel("")
    w.hint_label.setWordWrap(True)
    w.hint_label.setVisible(False)  # shown only while it says something: the dock is tight
    w.status_label = QLabel("")
    w.status_label.setWordWrap(True)
    status_row = QHBoxLayout()
    status_row.addWidget(w.status_label, 1)
    status_row.addWidget(w.prefetch_label, 0, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop)
    w.shortcuts_label = QLabel(
        "<b>Keys</b> (prompt layers selected): "
        + " · ".join(f"<b>{k}</b> {SHORT_NAMES.get(k, v)}" for k, v in SHORTCUTS))
    w.shortcuts_label.setWordWrap(True)
    w.shortcuts_label.setTextFormat(Qt.TextFormat.RichText)
    w.shortcuts_label.setToolTip("\n".join(f"{k}: {v}" for k, v in SHORTCUTS))

    layout = QVBoxLayout(w)
    layout.addLayout(lform)
    layout.addWidget(w.class_box)
    layout.addLayout(grid)
    layout.addLayout(range_row)
    layout.addLayout(prefetch_row)
    layout.addWidget(w.progress_bar)
    layout.addWidget(w.hint_label)
    layout.addLayout(status_row)
    layout.addWidget(w.shortcuts_label)
    layout.addStretch(1)
