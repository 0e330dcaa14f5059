"""The Classes box: add, remove, rename, relabel (refused when taken or not positive), colours."""

from __future__ import annotations

from qtpy.QtGui import QColor

from napari_medsam import _layers
from napari_medsam._qt import _class_table
from napari_medsam._qt._class_table import COLOUR, LABEL, NAME, ClassTable


def _box(qtbot) -> tuple[ClassTable, list[str], list[int]]:
    box = ClassTable([_layers.LabelClass("liver", "#ff0000", 1), _layers.LabelClass("spleen", "#00ff00", 3)])
    qtbot.addWidget(box)
    hints: list[str] = []
    changes: list[int] = []
    box.hint.connect(hints.append)
    box.changed.connect(lambda: changes.append(1))
    return box, hints, changes


def test_add_takes_the_lowest_free_label_and_selects_it(qtbot):
    box, _, changes = _box(qtbot)
    box.add_class()
    assert [c.label_id for c in box.classes] == [1, 3, 2]
    assert box.current.label_id == 2 and box.table.rowCount() == 3
    assert changes


def test_remove_takes_the_selected_class_and_keeps_the_last_one(qtbot):
    box, _, _ = _box(qtbot)
    box.select(0)
    box.remove_class()
    assert [c.name for c in box.classes] == ["spleen"]
    box.remove_class()
    assert [c.name for c in box.classes] == ["spleen"]  # one class always stays


def test_editing_a_name_and_a_free_label(qtbot):
    box, hints, _ = _box(qtbot)
    box.table.item(0, NAME).setText("left kidney")
    box.table.item(0, LABEL).setText("7")
    assert box.classes[0] == _layers.LabelClass("left kidney", "#ff0000", 7)
    assert not hints


def test_a_taken_or_invalid_label_is_put_back_with_a_hint(qtbot):
    box, hints, _ = _box(qtbot)
    for bad in ("3", "0", "-2", "kidney"):
        box.table.item(0, LABEL).setText(bad)
        assert box.classes[0].label_id == 1
        assert box.table.item(0, LABEL).text() == "1"
    assert len(hints) == 4 and "positive integer" in hints[0]


def test_double_clicking_the_swatch_sets_the_colour(qtbot, monkeypatch):
    box, _, _ = _box(qtbot)
    monkeypatch.setattr(_class_table.QColorDialog, "getColor", staticmethod(lambda *a: QColor("#123456")))
    box.table.cellDoubleClicked.emit(1, NAME)  # not the swatch: nothing happens
    assert box.classes[1].color == "#00ff00"
    box.table.cellDoubleClicked.emit(1, COLOUR)
    assert box.classes[1].color == "#123456"
    assert box.table.item(1, COLOUR).text() == "#123456"


def test_empty_class_list_falls_back_to_the_defaults(qtbot):
    box, _, _ = _box(qtbot)
    box.set_classes([])
    assert box.classes == _layers.default_classes()
