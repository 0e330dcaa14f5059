"""Dock widget plumbing shared by the widgets: fit the height to the contents, clean up on close."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QDockWidget, QMainWindow, QWidget


def fit_dock_height(widget: QWidget, *, later: bool = True) -> None:
    """Ask the main window to give ``widget``'s dock the height its contents want.

    napari lets a dock shrink to 50 px, and a dock keeps its height when its contents shrink, so
    without this a widget added below another one can be squashed (its table and buttons overlap)
    while the one above keeps empty space. Only the dock's size changes; nothing private is used.
    """
    if later:
        QTimer.singleShot(0, lambda: fit_dock_height(widget, later=False))
        return
    try:
        dock = widget.parentWidget()
    except RuntimeError:  # the widget was deleted before the timer fired
        return
    while dock is not None and not isinstance(dock, QDockWidget):
        dock = dock.parentWidget()
    main = dock.parentWidget() if dock is not None else None
    if not isinstance(main, QMainWindow) or dock.isFloating():
        return
    title = dock.titleBarWidget().sizeHint().height() if dock.titleBarWidget() is not None else 24
    main.resizeDocks([dock], [widget.sizeHint().height() + title + 8], Qt.Orientation.Vertical)


class DockWidget(QWidget):
    """A plugin dock: fits its height once when napari first docks it, calls ``cleanup()`` on close."""

    _fitted = False

    def cleanup(self) -> None:  # pragma: no cover - overridden
        """Stop background work and disconnect from the viewer."""

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        if not self._fitted:
            self._fitted = True
            fit_dock_height(self)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self.cleanup()
        super().closeEvent(event)
