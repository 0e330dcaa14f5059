"""The usual radiological views of a volume, without touching its array. No Qt; napari is used
through the viewer and layer objects passed in.

A NIfTI stores its voxels in whatever order the scanner wrote them: a CT often has the patient's
left-right axis first, so napari's default view (slice along the first axis) shows stretched
sagittal slices. The functions here read the scan's affine (voxel -> patient RAS+ mm, kept in the
reader's layer metadata) and compute the ``viewer.dims.order`` and ``viewer.camera.orientation2d``
that show an anatomical plane the way radiologists read it:

* axial: anterior at the top, the patient's right on the screen's left;
* coronal: superior at the top, the patient's right on the screen's left;
* sagittal: superior at the top, anterior on the left.

Only the view changes: data and world coordinates stay as they are, so prompts, labels and
exported files keep the array order of the scan. :func:`describe_slice` names the slice under view
along the axis the viewer slices *now* (for a dock's status line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _layers

PLANES = ("axial", "coronal", "sagittal")
_PLANE_NORMAL = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS axis each plane is perpendicular to
_PLANE_ROWS_COLS = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}  # (rows, columns) as RAS axes


@dataclass(frozen=True)
class PlaneView:
    """How to show one anatomical plane of a layer: ``order`` for ``viewer.dims.order``,
    ``orientation2d`` for ``viewer.camera.orientation2d`` (vertical, horizontal), and ``axis``,
    the layer's data axis that is sliced."""

    plane: str
    order: tuple[int, ...]
    orientation2d: tuple[str, str]
    axis: int


def layer_affine(layer: Any) -> np.ndarray | None:
    """The 4x4 voxel -> patient (RAS+ mm, NIfTI convention) affine of an image or labels layer,
    from the reader's metadata; None when the layer has none."""
    md = getattr(layer, "metadata", None)
    if not isinstance(md, dict):
        return None
    affine = md.get("affine")
    if affine is None:
        ours = md.get(_layers.META_KEY)
        for key in ("volume", "reference"):
            vol = ours.get(key) if isinstance(ours, dict) else None
            affine = getattr(vol, "affine", None)
            if affine is not None:
                break
    if affine is None or np.shape(affine) != (4, 4) or not np.all(np.isfinite(affine)):
        return None
    return np.asarray(affine, dtype=float)


def anatomical_axes(affine: np.ndarray) -> tuple[tuple[int, int], ...]:
    """For each of the 3 data axes, ``(RAS axis, sign)``: the patient axis it runs along most
    closely (0 R-L, 1 A-P, 2 S-I; each data axis gets a different one, as in nibabel's
    ``aff2axcodes``) and +1 when the index grows towards R, A or S."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=float))
    return tuple((int(a), int(s)) for a, s in ornt)


def _world_of_data_axes(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """For each data axis of a 3D layer: the world axis it moves along, and the sign."""
    origin = np.asarray(layer.data_to_world(np.zeros(3)), dtype=float)
    jac = np.stack([np.asarray(layer.data_to_world(np.eye(3)[d]), dtype=float) - origin for d in range(3)], axis=1)
    world = np.argmax(np.abs(jac), axis=0)
    return world, np.sign(jac[world, np.arange(3)])


def plane_of_axis(layer: Any, axis: int) -> str | None:
    """The anatomical plane that slices along data ``axis`` show (None without an affine)."""
    affine = layer_affine(layer)
    if affine is None or int(layer.ndim) != 3:
        return None
    ras = anatomical_axes(affine)[int(axis)][0]
    return next(p for p, a in _PLANE_NORMAL.items() if a == ras)


def plane_view(layer: Any, plane: str = "axial", *, ndim: int | None = None) -> PlaneView | None:
    """The dims order and camera orientation showing ``plane`` of a 3D layer the radiological way.

    ``ndim``: the viewer's number of dims (default 3; extra leading dims keep their place).
    None for a layer without an anatomical affine or not 3D.
    """
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    affine = layer_affine(layer)
    if affine is None or int(layer.ndim) != 3:
        return None
    ras = anatomical_axes(affine)
    world, wsign = _world_of_data_axes(layer)
    data_of_ras = {a: d for d, (a, _) in enumerate(ras)}
    rows_ras, cols_ras = _PLANE_ROWS_COLS[plane]
    d_slice, d_rows, d_cols = data_of_ras[_PLANE_NORMAL[plane]], data_of_ras[rows_ras], data_of_ras[cols_ras]
    towards = {d: ras[d][1] * int(wsign[d]) for d in range(3)}  # +1: the world axis runs towards R, A or S
    vertical = "up" if towards[d_rows] > 0 else "down"  # anterior / superior at the top
    horizontal = "left" if towards[d_cols] > 0 else "right"  # patient's right / anterior on the left
    offset = (3 if ndim is None else int(ndim)) - 3
    order = tuple(range(offset)) + tuple(offset + int(world[d]) for d in (d_slice, d_rows, d_cols))
    return PlaneView(plane=plane, order=order, orientation2d=(vertical, horizontal), axis=d_slice)


def show_plane(viewer: Any, layer: Any, plane: str = "axial") -> PlaneView | None:
    """Show ``plane`` of ``layer`` in ``viewer`` (the one-click axial / coronal / sagittal of a
    dock): sets ``dims.order`` and the camera's 2D orientation; the slice position stays. Returns
    what it set, or None (changing nothing) for a layer without an anatomical affine."""
    pv = plane_view(layer, plane, ndim=int(viewer.dims.ndim))
    if pv is None:
        return None
    viewer.dims.order = pv.order
    scene = getattr(viewer, "scene", None)  # napari >= 0.9 keeps the camera on the scene
    camera = scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera
    camera.orientation2d = pv.orientation2d
    return pv


def show_radiological_on_open(viewer: Any) -> Any:
    """From now on every 3D image layer with an anatomical affine added to ``viewer`` opens in
    the axial radiological view (a dock calls this once per viewer). Returns the callback
    connected to ``viewer.layers.events.inserted``; disconnect it to stop."""

    def on_inserted(event: Any) -> None:
        layer = event.value
        if getattr(layer, "_type_string", "") == "image" and not getattr(layer, "rgb", False):
            show_plane(viewer, layer, "axial")

    viewer.layers.events.inserted.connect(on_inserted)
    return on_inserted


def describe_slice(dims: Any, layer: Any) -> str:
    """The slice under view in words, along the axis the viewer slices *now*, e.g. ``"axial slice
    92 of 189 (array axis 2)"`` (no plane name without an affine); ``""`` when the viewer's point
    lies outside the layer."""
    view = _layers.current_slice(dims, layer)
    if view is None:
        return ""
    if not view.is_3d:
        return "2D image"
    plane = plane_of_axis(layer, view.axis)
    return f"{plane + ' slice' if plane else 'slice'} {view.index} of {view.n_slices} (array axis {view.axis})"
