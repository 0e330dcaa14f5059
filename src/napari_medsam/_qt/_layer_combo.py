"""A combo box of viewer layers that follows insertions, removals, renames and reorders.

Layers are tracked by object, not by name: renaming a layer keeps it selected, removing it selects
the next one that fits (or none), and an optional ``extra`` entry (e.g. "new labels layer") sits
last with ``None`` as its layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QWidget


class LayerCombo(QComboBox):
    """Layers of ``viewer`` accepted by ``accept(layer)``, newest first; emits ``layer_changed``."""

    layer_changed = Signal(object)

    def __init__(self, viewer: Any, accept: Callable[[Any], bool], *, extra: str | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.accept = accept
        self.extra = extra
        self._layers: list[Any] = []
        self._current: Any = None
        self._watched: list[Any] = []
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        self.currentIndexChanged.connect(self._on_index)
        events = viewer.layers.events
        for name in ("inserted", "removed", "moved", "reordered"):
            getattr(events, name).connect(self.refresh)
        self.refresh()

    # -- public -------------------------------------------------------------------------------------
    @property
    def layer(self) -> Any:
        """The selected layer, or None (nothing fits, or the ``extra`` entry is selected)."""
        return self._current

    def set_layer(self, layer: Any) -> None:
        if layer in self._layers:
            self.setCurrentIndex(self._layers.index(layer))
        elif layer is None and self.extra is not None:
            self.setCurrentIndex(len(self._layers))

    def refresh(self, event: Any = None) -> None:
        """Rebuild the list from the viewer, keeping the selected layer if it is still there."""
        layers = [ly for ly in reversed(list(self.viewer.layers)) if self._safe_accept(ly)]
        previous = self._current
        self._watch(layers)
        self.blockSignals(True)
        try:
            self.clear()
            for ly in layers:
                self.addItem(ly.name)
            if self.extra is not None:
                self.addItem(self.extra)
            self._layers = layers
            if previous in layers:
                self.setCurrentIndex(layers.index(previous))
            elif layers or self.extra is not None:
                self.setCurrentIndex(0)
        finally:
            self.blockSignals(False)
        self._on_index(self.currentIndex())

    def disconnect_viewer(self) -> None:
        events = self.viewer.layers.events
        for name in ("inserted", "removed", "moved", "reordered"):
            getattr(events, name).disconnect(self.refresh)
        self._watch([])

    # -- internals ----------------------------------------------------------------------------------
    def _safe_accept(self, layer: Any) -> bool:
        try:
            return bool(self.accept(layer))
        except (AttributeError, TypeError, ValueError):
            return False

    def _watch(self, layers: list[Any]) -> None:
        for ly in self._watched:
            ly.events.name.disconnect(self._on_rename)
        for ly in layers:
            ly.events.name.connect(self._on_rename)
        self._watched = list(layers)

    def _on_rename(self, event: Any = None) -> None:
        for i, ly in enumerate(self._layers):
            if self.itemText(i) != ly.name:
                self.setItemText(i, ly.name)

    def _on_index(self, index: int) -> None:
        layer = self._layers[index] if 0 <= index < len(self._layers) else None
        if layer is not self._current:
            self._current = layer
            self.layer_changed.emit(layer)
