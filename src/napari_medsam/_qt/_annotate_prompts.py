"""The Annotate dock's prompt layers and prompt modes: a Points and a Shapes layer per image,
box or point mode, negative clicks, the dock's key bindings."""

from __future__ import annotations

from typing import Any

from .. import _layers
from ..core.registry import DEFAULT_MODEL


class PromptsMixin:
    """Prompt layers and modes of :class:`~napari_medsam._qt.annotation_widget.AnnotationWidget`."""

    def prompt_layers(self, create: bool = True) -> tuple[Any, Any]:
        """The Points and Shapes layers of the selected image (made again if the user deleted them)."""
        image = self.image_layer
        if image is None:
            return None, None
        pts, shp = self._prompt_layers.get(id(image), (None, None))
        if not create:
            return (pts if pts in self.viewer.layers else None, shp if shp in self.viewer.layers else None)
        points_kwargs, shapes_kwargs = _layers.prompt_layers_kwargs(image)
        if shp is None or shp not in self.viewer.layers:
            shp = self.viewer.add_shapes(**shapes_kwargs)
            shp.events.data.connect(self._on_prompts_changed)
            self._bind_keys(shp)
        if pts is None or pts not in self.viewer.layers:
            pts = self.viewer.add_points(**points_kwargs)
            pts.feature_defaults = {_layers.POSITIVE: not self._negative}
            pts.events.data.connect(self._on_prompts_changed)
            pts.mouse_drag_callbacks.insert(0, self._on_points_press)
            self._bind_keys(pts)
            pts.mode = "add"
        self._prompt_layers[id(image)] = (pts, shp)
        return pts, shp

    def _reselect_prompt_layer(self) -> None:
        pts, shp = self.prompt_layers(create=False)
        active = self.viewer.layers.selection.active
        if active not in (pts, shp):
            target = shp if self._box_preferred() and shp is not None else pts
            if target is not None:
                self.viewer.layers.selection.active = target

    def _bind_keys(self, layer: Any) -> None:
        bindings = {
            "C": lambda _ly: self.commit(),
            "G": lambda _ly: self.propagate(),
            "Q": lambda _ly: self.clear_slice(),
            "Shift-Q": lambda _ly: self.clear_all(),
            "U": lambda _ly: self.undo(),
            "N": lambda _ly: self.negative_button.toggle(),
        }
        for key, fn in bindings.items():
            layer.bind_key(key, fn, overwrite=True)

    # ---- prompt modes -------------------------------------------------------------------------------
    def _box_preferred(self) -> bool:
        from ..core.registry import get_spec

        loaded = self.session.loaded
        spec = loaded.spec if loaded is not None else get_spec(DEFAULT_MODEL)
        return spec.box_preferred

    def activate_points(self) -> None:
        pts, _ = self.prompt_layers()
        if pts is not None:
            self.viewer.layers.selection.active = pts
            pts.mode = "add"

    def activate_box(self) -> None:
        _, shp = self.prompt_layers()
        if shp is not None:
            self.viewer.layers.selection.active = shp
            shp.mode = "add_rectangle"

    def _on_negative_toggled(self, checked: bool) -> None:
        self._negative = bool(checked)
        pts, _ = self.prompt_layers(create=False)
        if pts is not None:
            pts.feature_defaults = {_layers.POSITIVE: not self._negative}

    def _on_points_press(self, layer: Any, event: Any) -> None:
        """Shift+click adds a negative point (or a positive one while negative clicks are on)."""
        if layer.mode != "add":
            return
        shift = "Shift" in [str(m) for m in getattr(event, "modifiers", ())]
        layer.feature_defaults = {_layers.POSITIVE: not (self._negative ^ shift)}
