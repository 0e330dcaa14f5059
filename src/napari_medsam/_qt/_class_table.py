"""The "Classes" box of the Annotate dock: one row per structure (name, colour, label value).

Names are edited in place, a colour by double-clicking its swatch, a label value in place (a
positive integer no other class uses; anything else is put back and said why). The box owns the
list of :class:`~napari_medsam._layers.LabelClass` and says when it changed (``changed``: edited,
added, removed, or another row selected); what a class means for the layers is the Annotate
widget's business.
"""

from __future__ import annotations

from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QColorDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .. import _layers

NAME, COLOUR, LABEL = 0, 1, 2


class ClassTable(QGroupBox):
    """Classes to annotate; emits ``changed()`` and ``hint(text)`` (a refused edit, said why)."""

    changed = Signal()
    hint = Signal(str)

    def __init__(self, classes: list[_layers.LabelClass] | None = None, parent: QWidget | None = None) -> None:
        super().__init__("Classes", parent)
        self.classes: list[_layers.LabelClass] = list(classes or _layers.default_classes())
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Class", "Colour", "Label"])
        self.table.horizontalHeader().setSectionResizeMode(NAME, QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setMinimumHeight(84)  # header and two rows, even on a small screen
        self.table.setMaximumHeight(130)
        self.add_button = QPushButton("Add class")
        self.remove_button = QPushButton("Remove class")
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addLayout(buttons)

        self.add_button.clicked.connect(self.add_class)
        self.remove_button.clicked.connect(self.remove_class)
        self.table.itemChanged.connect(self._on_edited)
        self.table.cellDoubleClicked.connect(self._on_double_clicked)
        self.table.itemSelectionChanged.connect(self.changed.emit)
        self._fill()

    # ---- public ------------------------------------------------------------------------------------
    @property
    def current(self) -> _layers.LabelClass:
        """The selected class (the first when none is selected)."""
        row = self._selected_row()
        return self.classes[min(0 if row is None else row, len(self.classes) - 1)]

    def set_classes(self, classes: list[_layers.LabelClass]) -> None:
        self.classes = list(classes) or _layers.default_classes()
        self._fill()

    def select(self, index: int) -> None:
        self.table.selectRow(int(index))

    def add_class(self) -> None:
        """A new class with the lowest label value not in use, selected."""
        used = {c.label_id for c in self.classes}
        new_id = next(i for i in range(1, len(used) + 2) if i not in used)
        color = _layers.DEFAULT_COLORS[(new_id - 1) % len(_layers.DEFAULT_COLORS)]
        self.classes.append(_layers.LabelClass(f"structure {new_id}", color, new_id))
        self._fill()
        self.table.selectRow(len(self.classes) - 1)

    def remove_class(self) -> None:
        """Remove the selected class (the last when none is selected); the last class stays."""
        if len(self.classes) <= 1:
            return
        row = self._selected_row()
        del self.classes[len(self.classes) - 1 if row is None else row]
        self._fill()

    # ---- internals ---------------------------------------------------------------------------------
    def _selected_row(self) -> int | None:
        model = self.table.selectionModel()
        rows = model.selectedRows() if model is not None else []
        return rows[0].row() if rows else None

    def _fill(self) -> None:
        self.table.blockSignals(True)
        try:
            self.table.setRowCount(len(self.classes))
            for row, c in enumerate(self.classes):
                self.table.setItem(row, NAME, QTableWidgetItem(c.name))
                colour = QTableWidgetItem(c.color)
                colour.setData(Qt.ItemDataRole.DecorationRole, QColor(c.color))  # a swatch, visible when selected
                colour.setFlags(colour.flags() & ~Qt.ItemFlag.ItemIsEditable)
                colour.setToolTip("double-click to change")
                self.table.setItem(row, COLOUR, colour)
                self.table.setItem(row, LABEL, QTableWidgetItem(str(c.label_id)))
        finally:
            self.table.blockSignals(False)
        if self._selected_row() is None:
            self.table.selectRow(0)
        self.changed.emit()

    def _on_edited(self, item: QTableWidgetItem) -> None:
        row, col = item.row(), item.column()
        if not 0 <= row < len(self.classes):
            return
        c = self.classes[row]
        if col == NAME:
            self.classes[row] = _layers.LabelClass(item.text() or c.name, c.color, c.label_id)
        elif col == LABEL:
            try:
                value = int(item.text())
            except ValueError:
                value = -1
            others = {k.label_id for i, k in enumerate(self.classes) if i != row}
            if value < 1 or value in others:
                self.table.blockSignals(True)
                item.setText(str(c.label_id))
                self.table.blockSignals(False)
                self.hint.emit("A label must be a positive integer that no other class uses.")
                return
            self.classes[row] = _layers.LabelClass(c.name, c.color, value)
        self.changed.emit()

    def _on_double_clicked(self, row: int, col: int) -> None:
        if col != COLOUR:
            return
        c = self.classes[row]
        colour = QColorDialog.getColor(QColor(c.color), self, f"Colour of {c.name}")
        if colour.isValid():
            self.classes[row] = _layers.LabelClass(c.name, colour.name(), c.label_id)
            self._fill()
