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
