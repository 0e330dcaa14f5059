"""OME-Zarr (NGFF 0.4) image + label pyramids, written with ome-zarr-py.

:func:`write_ome_zarr` writes the image as a multiscale pyramid at the root of the store and each
label array under ``labels/<name>`` with its own pyramid and ``image-label`` metadata (a colour
and a class name per label value), as the NGFF spec lays them out; napari-ome-zarr shows the
labels over the image at every scale::

    scan.ome.zarr/
        0, 1, 2 ...             image levels; each halves the in-plane (y, x) size
        labels/<name>/0, 1 ...  the same levels of the labels (nearest neighbour)

Coordinate transformations come from the source geometry: level ``l`` has ``scale = spacing *
factor`` and ``translation = origin + (factor - 1) * spacing / 2`` (voxel centres stay where they
are). NGFF 0.4 has no rotation, so the full affine (NIfTI, DICOM) is also kept under the
``napari_medsam`` attribute, which :func:`~napari_medsam.io.read_image` reads back. The store is
zarr format 2, built in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from napari_medsam.core.errors import InvalidImageError
from napari_medsam.io.volume import ImageVolume

__all__ = ["image_label_metadata", "label_colors", "pyramid_factors", "write_ome_zarr", "write_pyramid"]

_MIN_SIDE = 8  # a level is added while its shorter in-plane side stays at least this long
_MAX_LEVELS = 5
_MAX_CHUNK = 4096

# a fixed, distinguishable palette (label value 1.. cycles through it)
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
)


def label_colors(values: Sequence[int]) -> dict[int, tuple[int, int, int, int]]:
    """RGBA 0-255 colours for label values (0 is transparent)."""
    return {int(v): (0, 0, 0, 0) if int(v) == 0 else (*_PALETTE[(int(v) - 1) % len(_PALETTE)], 255)
            for v in values}


def pyramid_factors(shape: Sequence[int], levels: int | None = None) -> list[tuple[int, ...]]:
    """Per-level downsampling factors per axis: ``(1, 2**l, 2**l)`` (3D) / ``(2**l, 2**l)`` (2D).

    ``levels=None`` adds levels while the shorter in-plane side stays >= 8 voxels (at most 5).
    """
    plane = min(int(s) for s in shape[-2:])
    if levels is None:
        levels = 1
        while levels < _MAX_LEVELS and -(-plane // 2**levels) >= _MIN_SIDE:
            levels += 1
    if levels < 1:
        raise InvalidImageError(f"a pyramid needs at least one level, got {levels}")
    lead = (1,) * (len(shape) - 2)
    return [(*lead, 2**lvl, 2**lvl) for lvl in range(levels)]


def _downsample(array: np.ndarray, factor: tuple[int, ...], *, labels: bool) -> np.ndarray:
    if all(f == 1 for f in factor):
        return array
    if labels:
        return np.ascontiguousarray(array[tuple(slice(None, None, f) for f in factor)])
    # block mean over the edge-padded array: the same (ceil) shape as the strided labels
    pad = [(0, (-s) % f) for s, f in zip(array.shape, factor, strict=True)]
    padded = np.pad(array.astype(np.float64, copy=False), pad, mode="edge")
    shape = []
    for s, f in zip(padded.shape, factor, strict=True):
        shape += [s // f, f]
    out = padded.reshape(shape).mean(axis=tuple(range(1, 2 * len(factor), 2)))
    return out.astype(array.dtype) if array.dtype.kind == "f" else np.round(out).astype(array.dtype)


def _transforms(spacing: Sequence[float], origin: Sequence[float], factors: list[tuple[int, ...]]) -> list:
    out = []
    for factor in factors:
        scale = [float(s) * f for s, f in zip(spacing, factor, strict=True)]
        shift = [float(o) + (f - 1) * float(s) / 2 for o, s, f in zip(origin, spacing, factor, strict=True)]
        out.append([{"type": "scale", "scale": scale}, {"type": "translation", "translation": shift}])
    return out


def _storage(shape: Sequence[int]) -> dict[str, Any]:
    plane = tuple(min(int(s), _MAX_CHUNK) for s in shape[-2:])
    return {"chunks": (1, *plane) if len(shape) == 3 else plane}


def _ours(volume: ImageVolume | None, spacing: Sequence[float], origin: Sequence[float], kind: str) -> dict:
    affine = None if volume is None or volume.affine is None else np.asarray(volume.affine, float).tolist()
    return {"kind": kind, "spacing": [float(s) for s in spacing], "origin": [float(o) for o in origin],
            "affine": affine}


def image_label_metadata(labels: np.ndarray, class_names: Mapping[int, str] | None = None,
                         colors: Mapping[int, Sequence[int]] | None = None) -> dict[str, Any]:
    """The NGFF ``image-label`` colours and class names of the values present in ``labels``.

    Missing colours come from :func:`label_colors`; missing names read ``class <value>``.
    """
    values = [int(v) for v in np.unique(labels) if v]
    palette = label_colors(values)
    return {
        "version": "0.4",
        "colors": [{"label-value": v, "rgba": [int(c) for c in (colors or {}).get(v, palette[v])]}
                   for v in values],
        "properties": [{"label-value": v, "class": str((class_names or {}).get(v, f"class {v}"))}
                       for v in values],
    }


def write_pyramid(where: Any, data: np.ndarray, *, spacing: Sequence[float], origin: Sequence[float],
                  meta: Mapping[str, Any], name: str, levels: int | None = None,
                  labels: Mapping[str, Any] | None = None) -> Any:
    """Write ``data`` as one NGFF 0.4 multiscale (zarr format 2) with ome-zarr-py; returns its group.

    ``where`` is a new folder (the store's root is the multiscale: an image, or with ``labels``
    the ``image-label`` metadata a labels-only store carries) or an open group, under whose
    ``labels/<name>`` the label pyramid goes, as NGFF lays out labels beside their image. Label
    levels are subsampled (nearest neighbour), image levels block-averaged; ``meta`` is written
    as the ``napari_medsam`` attribute (geometry with the full affine).
    """
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale, write_multiscale_labels

    factors = pyramid_factors(data.shape, levels)
    pyramid = [_downsample(data, f, labels=labels is not None) for f in factors]
    common = {"fmt": FormatV04(), "axes": [{"name": n, "type": "space"} for n in ("z", "y", "x")[-data.ndim:]],
              "coordinate_transformations": _transforms(spacing, origin, factors),
              "storage_options": [_storage(p.shape) for p in pyramid]}
    if isinstance(where, zarr.Group):
        write_multiscale_labels(pyramid, where, name, label_metadata=dict(labels or {}), **common)
        group = where["labels"][name]
    else:
        group = zarr.open_group(os.fspath(where), mode="w-", zarr_format=2)
        write_multiscale(pyramid, group, name=name, **common)
        if labels is not None:
            group.attrs["image-label"] = dict(labels)
    group.attrs["napari_medsam"] = dict(meta)
    return group


def write_ome_zarr(
    path: str | os.PathLike,
    image: ImageVolume,
    labels: Mapping[str, Any] | None = None,
    *,
    class_names: Mapping[int, str] | None = None,
    colors: Mapping[int, Sequence[int]] | None = None,
    levels: int | None = None,
    name: str = "image",
) -> pathlib.Path:
    """Write ``image`` and ``labels`` (``{name: array}``) as one OME-Zarr store; returns its path.

    Parameters
    ----------
    image
        The scan (2D or 3D, not RGB). Its data are read once, whole (a pyramid needs them).
    labels
        Integer arrays of the image's spatial shape, one per label image, 0 = background.
    class_names, colors
        Per label value: the ``properties`` ``class`` name and the RGBA colour (0-255) written to
        each label image's ``image-label`` metadata. Missing colours come from a fixed palette;
        missing names read ``class <value>``.
    levels
        Pyramid levels (default: see :func:`pyramid_factors`).

    Raises
    ------
    InvalidImageError
        An RGB image, labels of another shape or not integers, or a label name that is not a
        plain folder name.
    """
    from napari_medsam.io.writers import _atomic_dir

    if not isinstance(image, ImageVolume):
        raise InvalidImageError(f"image must be an ImageVolume, got {type(image).__name__}")
    if image.rgb:
        raise InvalidImageError("OME-Zarr pyramids are written for greyscale images; this one is RGB.")
    shape = image.spatial_shape
    checked: dict[str, np.ndarray] = {}
    for label_name, array in (labels or {}).items():
        if not label_name or "/" in label_name or label_name.startswith("."):
            raise InvalidImageError(f"label image name {label_name!r} must be a plain folder name")
        arr = np.asarray(array)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        if arr.dtype.kind not in "iu" or arr.shape != shape:
            raise InvalidImageError(
                f"labels {label_name!r} must be integers of the image's shape {shape}, "
                f"got {arr.dtype} {arr.shape}"
            )
        if arr.size and int(arr.min()) < 0:
            raise InvalidImageError(f"labels {label_name!r} must be >= 0 (0 = background)")
        checked[label_name] = arr
    data = np.asarray(image.data[...])
    if data.dtype == np.float16 or data.dtype == bool:
        data = data.astype(np.float32 if data.dtype == np.float16 else np.uint8)
    out = pathlib.Path(os.fspath(path)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_dir(out) as tmp:
        root = write_pyramid(tmp, data, spacing=image.spacing, origin=image.origin, levels=levels, name=name,
                             meta=_ours(image, image.spacing, image.origin, "image"))
        for label_name, arr in checked.items():
            write_pyramid(root, arr, spacing=image.spacing, origin=image.origin, levels=levels,
                          name=label_name, meta=_ours(image, image.spacing, image.origin, "labels"),
                          labels=image_label_metadata(arr, class_names, colors))
    return out
