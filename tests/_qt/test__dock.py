"""The dock base: session signals never reach a dock Qt has deleted (it used to raise "wrapped C/C++
object ... has been deleted" from a model load that finished after its dock was gone)."""

from __future__ import annotations

import gc

import pytest
from qtpy import sip

from napari_medsam._qt._dock import DockWidget
from napari_medsam.app.session import AnnotationSession

pytestmark = pytest.mark.gui


class _Dock(DockWidget):
    def __init__(self, session):
        super().__init__()
        self.calls = []
        self.connect_session(session.model_changed, self._on_model)

    def _on_model(self, loaded):
        self.calls.append(loaded)
        self.objectName()  # touches the C++ object: raises RuntimeError once it is deleted


def test_a_deleted_dock_is_disconnected_from_the_session(qtbot):
    session = AnnotationSession(disk_cache=False)
    dock = _Dock(session)
    session.model_changed.emit("a")
    assert dock.calls == ["a"]
    keep = dock  # the Python wrapper stays alive (as a running job's callback would keep it)
    sip.delete(dock)  # Qt deletes the widget without a close event
    qtbot.wait(10)
    assert sip.isdeleted(keep)
    session.model_changed.emit("b")  # must not call into the deleted widget
    assert keep.calls == ["a"]
    gc.collect()


def test_closing_a_dock_disconnects_it(qtbot):
    session = AnnotationSession(disk_cache=False)
    dock = _Dock(session)
    qtbot.addWidget(dock)
    dock.close()
    session.model_changed.emit("c")
    assert dock.calls == []


def test_the_plugin_menu_way_tabs_the_docks_so_the_window_fits_a_laptop_screen(make_napari_viewer, qtbot):
    """napari's Plugins menu adds a dock below the others in its area (``add_dock_widget`` without
    ``tabify``): Model, Annotate and Fine-tune stacked needed ~1,500 px of height and the window grew
    past the screen. Tabbed, the window's minimum height is the tallest dock's, and it is shrunk back."""
    from qtpy.QtWidgets import QDockWidget

    viewer = make_napari_viewer(show=True)
    main = viewer.window._qt_window
    main.resize(1000, 700)
    widgets = []
    for name in ("Model", "Annotate", "Fine-tune"):
        _, w = viewer.window.add_plugin_dock_widget("napari-medsam", name)  # tabify=False: the menu's call
        widgets.append(w)
        qtbot.wait(50)
    docks = [w.parentWidget() for w in widgets]
    while not all(isinstance(d, QDockWidget) for d in docks):
        docks = [d if isinstance(d, QDockWidget) else d.parentWidget() for d in docks]
    assert set(main.tabifiedDockWidgets(docks[2])) >= {docks[0], docks[1]}
    assert docks[2].isVisible() and widgets[2].isVisible()  # the one just opened is the tab shown
    main.layout().activate()
    assert main.minimumSizeHint().height() < 700
    screen = main.screen().availableGeometry()
    assert main.height() <= screen.height()
