"""napari layers <-> core value objects. No Qt; napari is imported only inside functions.

Everything that knows how a napari layer maps to the arrays the core works on lives here:

* image layers -> :class:`~napari_medsam.io.ImageVolume` (geometry from the reader's metadata, else
  from the layer's ``scale`` / ``translate``), and back (layer data tuples for the reader);
* the viewer's dims -> the slice under view (:class:`SliceView`: which data axis is sliced and at
  which index, with ``viewer.dims.order`` and non-unit scale / translate handled through
  ``layer.world_to_data``);
* Points / Shapes layers -> :class:`~napari_medsam.core.segment.Prompt2D` per slice, in ``(row, col)``
  data pixels of the image (napari's pixel-centre convention is the core's);
* masks -> Labels layer edits that never touch other labels, with an undo record.

Labels layers made here carry the image they were drawn on in ``metadata["napari_medsam"]
["reference"]``; the writer uses it to copy the scan's geometry into exported files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

# The slice and label-edit values live in the GUI-free app layer; the widgets reach them from here.
from .app.bookkeeping import LabelEdit, SliceView, label_mask, paint_masks, undo_edit, with_index  # noqa: F401

if TYPE_CHECKING:  # pragma: no cover
    from .core.segment import Prompt2D
    from .io import ImageVolume

META_KEY = "napari_medsam"
POSITIVE = "positive"  # Points feature: True for a positive click, False for a negative one

LayerData = tuple[Any, dict[str, Any], str]


def unwrap(obj: Any) -> Any:
    """The object behind napari's ``PublicOnlyProxy`` (plugin widgets receive the viewer wrapped).

    Proxies are new objects on every attribute access, so identity, ``id()`` and weak references
    of layers reached through them are meaningless; the widgets keep the real viewer instead.
    """
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


# ---- image volumes <-> layers -------------------------------------------------------------------


def _geometry_metadata(volume: ImageVolume) -> dict[str, Any]:
    """Metadata a reader layer carries: the volume itself, the affine and the NIfTI header."""
    md: dict[str, Any] = {META_KEY: {"volume": volume, "reference": volume, "source": volume.source,
                                     "format": volume.format}}
    if volume.affine is not None:
        md["affine"] = np.array(volume.affine)
    for key in ("nifti_header", "qform", "sform", "qform_code", "sform_code"):
        if key in volume.meta:
            md[key] = volume.meta[key]
    return md


def _layer_name(volume: ImageVolume, default: str) -> str:
    if not volume.source:
        return default
    from .io.readers import split_extension

    stem, _ = split_extension(volume.source.rstrip("/\\"))
    return stem or default


def image_layer_data(volume: ImageVolume, *, name: str | None = None) -> LayerData:
    """A napari ``(data, kwargs, "image")`` tuple showing ``volume`` at its voxel geometry."""
    kwargs: dict[str, Any] = {
        "name": name or _layer_name(volume, "image"),
        "scale": tuple(volume.spacing),
        "translate": tuple(volume.origin),
        "rgb": volume.rgb,
        "metadata": _geometry_metadata(volume),
    }
    if not volume.rgb:
        kwargs["colormap"] = "gray"
        window = _ct_display_window(volume)
        if window is not None:
            kwargs["contrast_limits"] = window
    return volume.data, kwargs, "image"


def labels_layer_data(volume: ImageVolume, *, name: str | None = None) -> LayerData:
    """A napari ``(data, kwargs, "labels")`` tuple (labels are loaded into memory to be editable)."""
    data = np.asarray(volume.data[...])
    if data.dtype.kind == "f":
        data = data.astype(np.int32)
    kwargs = {
        "name": name or _layer_name(volume, "labels"),
        "scale": tuple(volume.spacing),
        "translate": tuple(volume.origin),
        "metadata": _geometry_metadata(volume),
    }
    return data, kwargs, "labels"


def _ct_display_window(volume: ImageVolume) -> tuple[float, float] | None:
    """A soft-tissue display window (W 400, L 40) for data that look like CT in Hounsfield units."""
    from .core.preprocess import looks_like_ct

    try:
        if volume.spatial_ndim == 3 and looks_like_ct(volume.data, axis=0):
            return (-160.0, 240.0)
    except (ValueError, TypeError, OSError):
        return None
    return None


def _plain_data(layer: Any) -> Any:
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return data


def image_volume(layer: Any) -> ImageVolume:
    """The :class:`ImageVolume` an Image layer shows (no copy of the data).

    The reader's geometry (affine, NIfTI header) is used while the layer still holds an array of
    the same shape; otherwise spacing and origin come from ``layer.scale`` / ``layer.translate``.
    """
    from .io import ImageVolume

    data = _plain_data(layer)
    rgb = bool(getattr(layer, "rgb", False))
    stored = layer.metadata.get(META_KEY, {}).get("volume") if isinstance(layer.metadata, dict) else None
    n = int(layer.ndim)
    spacing = tuple(float(s) for s in layer.scale[-n:])
    origin = tuple(float(t) for t in layer.translate[-n:])
    if isinstance(stored, ImageVolume) and tuple(stored.shape) == tuple(data.shape) and stored.rgb == rgb:
        if stored.data is data and stored.spacing == spacing and stored.origin == origin:
            return stored
        return dataclasses.replace(stored, data=data, spacing=spacing, origin=origin)
    return ImageVolume(data=data, spacing=spacing, origin=origin, affine=None, rgb=rgb,
                       source=None, format="layer")


def spatial_shape(layer: Any) -> tuple[int, ...]:
    """Shape of an Image layer without its colour axis: the shape of labels drawn on it."""
    shape = tuple(int(s) for s in _plain_data(layer).shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def reference_from_metadata(metadata: dict[str, Any] | None) -> ImageVolume | None:
    """The image a Labels layer was drawn on, as stored by :func:`new_labels_kwargs` or the reader."""
    from .io import ImageVolume

    ours = (metadata or {}).get(META_KEY, {})
    ref = ours.get("reference") if isinstance(ours, dict) else None
    return ref if isinstance(ref, ImageVolume) else None


def layer_reference(layer_or_attributes: Any, shape: tuple[int, ...]) -> ImageVolume:
    """A reference volume for writing labels of ``shape``: the stored source image when it fits,
    else the layer's own ``scale`` / ``translate`` (and an ``affine`` in its metadata, if any).

    Accepts a Labels layer or the attribute dict napari passes to writers.
    """
    from .io import ImageVolume

    if isinstance(layer_or_attributes, dict):
        attrs = layer_or_attributes
        metadata, scale, translate = attrs.get("metadata") or {}, attrs.get("scale"), attrs.get("translate")
    else:
        layer = layer_or_attributes
        metadata, scale, translate = layer.metadata, layer.scale, layer.translate
    ref = reference_from_metadata(metadata)
    if ref is not None and tuple(ref.spatial_shape) == tuple(shape):
        return ref
    n = len(shape)
    spacing = None if scale is None else [float(s) for s in list(scale)[-n:]]
    origin = None if translate is None else [float(t) for t in list(translate)[-n:]]
    affine = metadata.get("affine") if isinstance(metadata, dict) else None
    if affine is not None and np.shape(affine) != (4, 4):
        affine = None
    # A broadcast zero array: the writer only needs the reference's shape and geometry.
    return ImageVolume(data=np.broadcast_to(np.uint8(0), shape), spacing=spacing, origin=origin,
                       affine=affine, rgb=False, source=None, format="layer")


def new_labels_kwargs(image_layer: Any, *, name: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``viewer.add_labels`` making an empty label volume for ``image_layer``.

    The image's volume (geometry, NIfTI header) goes into ``metadata`` so that exported labels
    keep the scan's geometry.
    """
    volume = image_volume(image_layer)
    n = int(image_layer.ndim)
    return {
        "data": np.zeros(spatial_shape(image_layer), dtype=np.uint16),
        "name": name or f"{image_layer.name} labels",
        "scale": tuple(image_layer.scale[-n:]),
        "translate": tuple(image_layer.translate[-n:]),
        "metadata": {META_KEY: {"reference": volume, "created_by": "napari-medsam",
                                "source_layer": image_layer.name},
                     **({"affine": np.array(volume.affine)} if volume.affine is not None else {})},
    }


def prompt_layers_kwargs(image_layer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments for ``viewer.add_points`` and ``viewer.add_shapes`` making the prompt
    layers of ``image_layer``: its geometry, positive points green and negative ones red (the
    :data:`POSITIVE` feature), yellow box outlines, marker sizes in the image's pixels."""
    n = int(image_layer.ndim)
    pixel = float(np.min(image_layer.scale[-2:]))
    geometry = {"ndim": n, "scale": image_layer.scale, "translate": image_layer.translate}
    points = {"data": np.zeros((0, n)), "name": f"{image_layer.name} points", **geometry,
              "features": {POSITIVE: np.zeros(0, dtype=bool)}, "face_color": POSITIVE,
              "face_color_cycle": {True: "lime", False: "red"}, "border_color": "white",
              "size": max(6.0 * pixel, 1e-3)}
    shapes = {"name": f"{image_layer.name} boxes", **geometry, "edge_color": "yellow",
              "face_color": "transparent", "edge_width": max(pixel, 1e-3) * 1.5}
    return points, shapes


def fits(labels_layer: Any, image_layer: Any) -> bool:
    """True when a Labels layer has the image's spatial shape (labels can be drawn on it)."""
    try:
        return tuple(int(s) for s in _plain_data(labels_layer).shape) == spatial_shape(image_layer)
    except (AttributeError, TypeError):
        return False


# ---- which slice is under view ------------------------------------------------------------------


def slice_axis(dims: Any, layer: Any) -> int:
    """The data axis of a 3D layer that the viewer slices through (handles ``dims.order``)."""
    n = int(layer.ndim)
    offset = int(dims.ndim) - n
    if int(dims.ndisplay) == 2:
        candidates = [w - offset for w in dims.not_displayed if w - offset >= 0]
    else:  # 3D rendering: the axis that would be sliced in 2D
        candidates = [w - offset for w in dims.order[:-2] if w - offset >= 0]
    return candidates[-1] if candidates else 0


def current_slice(dims: Any, layer: Any) -> SliceView | None:
    """The slice of ``layer`` under view, or None when the viewer's point lies outside the layer."""
    n = int(layer.ndim)
    if n == 2:
        return SliceView(axis=0, index=0, is_3d=False, rc_axes=(0, 1), n_slices=1)
    if n != 3:
        return None
    axis = slice_axis(dims, layer)
    data_pos = np.asarray(layer.world_to_data(np.asarray(dims.point, dtype=float)), dtype=float)
    n_slices = spatial_shape(layer)[axis]
    index = int(np.floor(data_pos[axis] + 0.5))
    if not 0 <= index < n_slices:
        return None
    rc = tuple(a for a in range(3) if a != axis)
    return SliceView(axis=axis, index=index, is_3d=True, rc_axes=(rc[0], rc[1]), n_slices=n_slices)


# ---- prompts ------------------------------------------------------------------------------------


def _to_image_data(src_layer: Any, image_layer: Any, coords: np.ndarray) -> np.ndarray:
    """``(N, D)`` data coordinates of ``src_layer`` -> ``(N, image.ndim)`` data coordinates of the image."""
    coords = np.atleast_2d(np.asarray(coords, dtype=float))
    if coords.size == 0:
        return np.zeros((0, int(image_layer.ndim)))
    return np.stack([np.asarray(image_layer.world_to_data(src_layer.data_to_world(c)), dtype=float)
                     for c in coords])


def _on_slice(coords: np.ndarray, view: SliceView) -> np.ndarray:
    if not view.is_3d:
        return np.ones(len(coords), dtype=bool)
    return np.floor(coords[:, view.axis] + 0.5).astype(int) == view.index


def point_prompts(points_layer: Any, image_layer: Any, view: SliceView) -> tuple[np.ndarray, np.ndarray]:
    """Points on the slice under view: ``(N, 2)`` float32 ``(row, col)`` and ``(N,)`` int64 labels."""
    if points_layer is None or len(points_layer.data) == 0:
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
    coords = _to_image_data(points_layer, image_layer, points_layer.data)
    feats = points_layer.features
    positive = (np.asarray(feats[POSITIVE], dtype=bool) if POSITIVE in feats
                else np.ones(len(coords), dtype=bool))
    keep = _on_slice(coords, view)
    rc = coords[keep][:, list(view.rc_axes)].astype(np.float32)
    return rc, positive[keep].astype(np.int64)


def box_prompts(shapes_layer: Any, image_layer: Any, view: SliceView) -> list[tuple[float, float, float, float]]:
    """Rectangles on the slice under view as ``(r0, c0, r1, c1)`` in image data pixels, oldest first."""
    if shapes_layer is None or len(shapes_layer.data) == 0:
        return []
    h, w = (spatial_shape(image_layer)[a] for a in view.rc_axes)
    out = []
    for verts, kind in zip(shapes_layer.data, shapes_layer.shape_type, strict=False):
        if kind not in ("rectangle", "polygon"):
            continue
        coords = _to_image_data(shapes_layer, image_layer, verts)
        if view.is_3d and not _on_slice(coords, view).all():
            continue
        rc = coords[:, list(view.rc_axes)]
        r0, c0 = np.maximum(rc.min(axis=0), -0.5)
        r1, c1 = np.minimum(rc.max(axis=0), (h - 0.5, w - 0.5))
        if r1 > r0 and c1 > c0:
            out.append((float(r0), float(c0), float(r1), float(c1)))
    return out


def slice_prompt(points_layer: Any, shapes_layer: Any, image_layer: Any, view: SliceView) -> Prompt2D | None:
    """The prompt of the slice under view (its points and its latest box), or None if there is none."""
    from .core.segment import Prompt2D

    pts, labels = point_prompts(points_layer, image_layer, view)
    boxes = box_prompts(shapes_layer, image_layer, view)
    box = boxes[-1] if boxes else None
    if len(pts) == 0 and box is None:
        return None
    return Prompt2D(points=pts, labels=labels, box=box)


def layer_prompts(points_layer: Any, shapes_layer: Any, image_layer: Any, view: SliceView) -> dict[int, Prompt2D]:
    """``{slice: Prompt2D}`` for every slice of ``image_layer`` along ``view.axis`` holding prompts."""
    out: dict[int, Prompt2D] = {}
    for z in prompted_slices(points_layer, shapes_layer, image_layer, view):
        p = slice_prompt(points_layer, shapes_layer, image_layer, with_index(view, z))
        if p is not None:
            out[z] = p
    return out


def prompted_slices(points_layer: Any, shapes_layer: Any, image_layer: Any, view: SliceView) -> list[int]:
    """Indices of every slice (along ``view.axis``) that holds a point or a box."""
    if not view.is_3d:
        has = (points_layer is not None and len(points_layer.data) > 0) or (
            shapes_layer is not None and len(shapes_layer.data) > 0)
        return [0] if has else []
    found: set[int] = set()
    if points_layer is not None and len(points_layer.data):
        coords = _to_image_data(points_layer, image_layer, points_layer.data)
        found.update(int(v) for v in np.floor(coords[:, view.axis] + 0.5))
    if shapes_layer is not None:
        for verts in shapes_layer.data:
            coords = _to_image_data(shapes_layer, image_layer, verts)
            found.add(int(np.floor(coords[0, view.axis] + 0.5)))
    return sorted(i for i in found if 0 <= i < view.n_slices)


def remove_prompts(points_layer: Any, shapes_layer: Any, image_layer: Any, view: SliceView | None) -> None:
    """Delete the points and shapes on the slice under view (every slice when ``view`` is None)."""
    if points_layer is not None and len(points_layer.data):
        if view is None:
            points_layer.data = np.zeros((0, points_layer.ndim))
        else:
            keep = ~_on_slice(_to_image_data(points_layer, image_layer, points_layer.data), view)
            if not keep.all():
                points_layer.selected_data = set(np.flatnonzero(~keep).tolist())
                points_layer.remove_selected()
    if shapes_layer is not None and len(shapes_layer.data):
        if view is None:
            shapes_layer.data = []
        else:
            drop = [i for i, v in enumerate(shapes_layer.data)
                    if _on_slice(_to_image_data(shapes_layer, image_layer, v), view).all()]
            if drop:
                shapes_layer.selected_data = set(drop)
                shapes_layer.remove_selected()


# ---- writing masks into Labels --------------------------------------------------------------------


def show_preview(preview_layer: Any, view: SliceView, mask: np.ndarray | None, label_id: int,
                 previous: SliceView | None) -> None:
    """Draw ``mask`` on ``view`` in the preview layer, clearing the slice drawn before."""
    data = preview_layer.data
    ndim = data.ndim
    if previous is not None and previous.is_3d == view.is_3d and previous.index < data.shape[previous.axis]:
        data[previous.region(ndim)] = 0
    if mask is not None:
        region = view.region(ndim)
        data[region] = np.where(np.asarray(mask, dtype=bool), np.uint8(min(int(label_id), 255)), np.uint8(0))
    # No thumbnail or extent update: the preview changes on every prompt, and the layer list's
    # thumbnail repaint costs the main thread more than the slice itself.
    preview_layer.refresh(thumbnail=False, extent=False, highlight=False)


# ---- classes ------------------------------------------------------------------------------------

DEFAULT_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                  "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324")


@dataclass(frozen=True)
class LabelClass:
    """One structure to annotate: its name, display colour (hex) and the label value it writes."""

    name: str
    color: str
    label_id: int


def default_classes(names: Sequence[str] = ("structure 1",)) -> list[LabelClass]:
    return [LabelClass(n, DEFAULT_COLORS[i % len(DEFAULT_COLORS)], i + 1) for i, n in enumerate(names)]


def class_colormap(classes: Sequence[LabelClass]) -> Any:
    """A napari ``DirectLabelColormap`` giving each class its colour (other labels grey)."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[int | None, Any] = {0: "transparent", None: "#b0b0b0"}
    for c in classes:
        colors[int(c.label_id)] = c.color
    return DirectLabelColormap(color_dict=colors)


#: Predictions and proposals (what the model wrote, not yet the user's): saturated colours unlike the
#: first user classes' (:data:`DEFAULT_COLORS`: red, green, blue, orange, purple), so class 1's
#: prediction is magenta where the user's class 1 is red.
PROPOSAL_COLOURS = {None: "orange", 0: "transparent", 1: "magenta", 2: "cyan", 3: "yellow", 4: "lime"}


def proposal_colormap() -> Any:
    """The one colormap of prediction and proposal Labels layers (the Fine-tune and Review docks)."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=dict(PROPOSAL_COLOURS))


def preview_metadata(image_layer: Any) -> dict[str, Any]:
    return {META_KEY: {"role": "preview", "created_by": "napari-medsam", "image_id": id(image_layer)}}


def preview_kwargs(image_layer: Any, label_class: LabelClass) -> dict[str, Any]:
    """Keyword arguments for ``viewer.add_labels`` making the preview layer of ``image_layer``
    (label 1, in the colour of ``label_class``, translucent over the image)."""
    return {"data": np.zeros(spatial_shape(image_layer), dtype=np.uint8), "name": "MedSAM preview",
            "scale": image_layer.scale, "translate": image_layer.translate, "opacity": 0.55,
            "blending": "translucent",
            "colormap": class_colormap([LabelClass(label_class.name, label_class.color, 1)]),
            "metadata": preview_metadata(image_layer)}


def is_preview(layer: Any, of: Any = None) -> bool:
    """True for the preview Labels layer (of the image ``of``, when given)."""
    md = getattr(layer, "metadata", None)
    ours = md.get(META_KEY) if isinstance(md, dict) else None
    if not isinstance(ours, dict) or ours.get("role") != "preview":
        return False
    return of is None or ours.get("image_id") == id(of)


def is_ours(layer: Any) -> bool:
    md = getattr(layer, "metadata", None)
    return isinstance(md, dict) and isinstance(md.get(META_KEY), dict) and \
        md[META_KEY].get("created_by") == "napari-medsam"


def painted_slices(event: Any, axis: int, n_slices: int) -> set[int]:
    """The slices along ``axis`` that a Labels layer's ``paint`` event (brush, fill, erase) changed,
    from its undo atoms (napari's masked atoms carry a bounding box of slices, older ones the indices)."""
    slices: set[int] = set()
    for atom in getattr(event, "value", None) or ():
        key = getattr(atom, "slice_key", None)
        if key is not None and isinstance(key[axis], slice):
            slices.update(range(*key[axis].indices(n_slices)))
        elif isinstance(atom, tuple) and len(atom[0]) == 3:  # (indices, old values, new values)
            slices.update(int(v) for v in np.unique(np.asarray(atom[0][axis])))
    return slices
