"""Dock widget plumbing shared by the widgets: tab the plugin's docks together, fit the height to the
contents, clean up on close."""

from __future__ import annotations

import contextlib
import functools
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
    dock, main = _dock_of(widget)
    if dock is None or dock.isFloating():
        return
    title = dock.titleBarWidget().sizeHint().height() if dock.titleBarWidget() is not None else 24
    main.resizeDocks([dock], [widget.sizeHint().height() + title + 8], Qt.Orientation.Vertical)


def _dock_of(widget: QWidget) -> tuple[QDockWidget | None, QMainWindow | None]:
    try:
        dock = widget.parentWidget()
    except RuntimeError:  # the widget was deleted before a timer fired
        return None, None
    while dock is not None and not isinstance(dock, QDockWidget):
        dock = dock.parentWidget()
    main = dock.parentWidget() if dock is not None else None
    return (dock, main) if isinstance(main, QMainWindow) else (None, None)


def tab_with_siblings(widget: QWidget) -> bool:
    """Put ``widget``'s dock in a tab beside the plugin's other docks in the same dock area.

    napari's Plugins menu adds every dock widget *below* the ones already in its area, so opening
    Model, Annotate and Fine-tune stacked their minimum heights (about 1,500 px) and the main
    window grew past a 1000 px screen (Train and napari's slice slider off-screen). Tabbed, each
    dock has the area's whole height. Docks of other plugins, floating ones and ones already in a
    tab group are left where they are. True if the dock was tabbed.
    """
    dock, main = _dock_of(widget)
    if dock is None or dock.isFloating() or main.tabifiedDockWidgets(dock):
        return False
    area = main.dockWidgetArea(dock)
    ours = [d for d in main.findChildren(QDockWidget)
            if d is not dock and not d.isFloating() and d.isVisible() and main.dockWidgetArea(d) == area
            and d.findChild(DockWidget) is not None]
    if not ours:
        return False
    main.tabifyDockWidget(ours[0], dock)
    dock.show()
    dock.raise_()
    _fit_to_screen(main)
    return True


def _fit_to_screen(main: QMainWindow) -> None:
    """Shrink the main window back inside its screen: Qt grew it to the stacked docks' minimum height
    before they were tabbed, and never shrinks a window by itself."""
    screen = main.screen() if hasattr(main, "screen") else None
    if screen is None or main.isMaximized() or main.isFullScreen():
        return
    if main.layout() is not None:
        main.layout().activate()  # the minimum size of the tabbed docks, not the stacked ones
    avail = screen.availableGeometry()
    frame = main.frameGeometry().height() - main.geometry().height()
    w, h = min(main.width(), avail.width()), min(main.height(), avail.height() - max(0, frame))
    if (w, h) != (main.width(), main.height()):
        main.resize(max(w, main.minimumSizeHint().width()), max(h, main.minimumSizeHint().height()))


def _disconnect_all(connections: list[tuple[Any, Any]], *_args: Any) -> None:
    while connections:
        signal, slot = connections.pop()
        with contextlib.suppress(Exception):  # already disconnected, or the emitter is gone
            signal.disconnect(slot)


class DockWidget(QWidget):
    """A plugin dock: tabs itself with the plugin's other docks and fits its height once when napari
    first docks it (:func:`tab_with_siblings`, :func:`fit_dock_height`), calls ``cleanup()`` on close.

    Session signals are connected through :meth:`connect_session`: they are disconnected when the
    dock closes and also when Qt deletes it without a close (a viewer torn down, a dock removed),
    so the session never calls into a deleted widget.
    """

    _fitted = False
    _session_connections: list[tuple[Any, Any]] | None = None

    def connect_session(self, signal: Any, slot: Any) -> None:
        """Connect a (psygnal) session ``signal`` to ``slot`` for this dock's lifetime."""
        if self._session_connections is None:
            self._session_connections = []
            # a function of the list, not of self: it runs while the C++ widget is being deleted
            self.destroyed.connect(functools.partial(_disconnect_all, self._session_connections))
        self._session_connections.append((signal, slot))
        signal.connect(slot)

    def disconnect_session(self) -> None:
        """Drop every connection made by :meth:`connect_session` (``cleanup`` and close call it)."""
        _disconnect_all(self._session_connections or [])

    def cleanup(self) -> None:  # pragma: no cover - overridden
        """Stop background work and disconnect from the viewer."""

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        if not self._fitted:
            self._fitted = True
            QTimer.singleShot(0, self._first_shown)

    def _first_shown(self) -> None:
        try:
            tab_with_siblings(self)
        except RuntimeError:  # deleted before the timer fired
            return
        fit_dock_height(self, later=False)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self.cleanup()
        self.disconnect_session()
        super().closeEvent(event)
