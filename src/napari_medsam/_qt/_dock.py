"""Dock widget plumbing shared by the widgets: fit the height to the contents, clean up on close."""

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


def _disconnect_all(connections: list[tuple[Any, Any]], *_args: Any) -> None:
    while connections:
        signal, slot = connections.pop()
        with contextlib.suppress(Exception):  # already disconnected, or the emitter is gone
            signal.disconnect(slot)


class DockWidget(QWidget):
    """A plugin dock: fits its height once when napari first docks it, calls ``cleanup()`` on close.

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
            fit_dock_height(self)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self.cleanup()
        self.disconnect_session()
        super().closeEvent(event)
