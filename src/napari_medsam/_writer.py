"""npe2 writers for Labels layers: NIfTI (with the source scan's geometry), OME-Zarr and TIFF.

The geometry comes from the image the labels were drawn on: Labels layers that this plugin creates
(and those its reader opens) carry that :class:`~napari_medsam.io.ImageVolume` in their metadata,
so a NIfTI export copies the scan's affine, qform / sform with their codes and zooms. A Labels layer
from elsewhere is written with its own ``scale`` / ``translate`` (and an ``affine`` in its metadata).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def _write(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    from . import _layers
    from .io import write_labels

    labels = np.asarray(data)
    reference = _layers.layer_reference(attributes, tuple(labels.shape))
    name = str(attributes.get("name") or "labels")
    written = write_labels(path, labels, reference=reference, name=name)
    return [os.fspath(written)]


def write_labels_nifti(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Save a Labels layer as ``.nii`` / ``.nii.gz`` with the source image's NIfTI geometry."""
    return _write(path, data, attributes)


def write_labels_ome_zarr(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Save a Labels layer as an OME-Zarr label image (spacing and origin as NGFF transforms)."""
    return _write(path, data, attributes)


def write_labels_tiff(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Save a Labels layer as an ImageJ TIFF (spacing, origin and affine in its metadata)."""
    return _write(path, data, attributes)


def write_ome_zarr_image_labels(path: str, layer_data: list[tuple[Any, dict[str, Any], str]]) -> list[str]:
    """Save one Image layer with its Labels layers as one OME-Zarr store (NGFF pyramids).

    The image goes to the root, each Labels layer to ``labels/<layer name>`` with its colours and
    class names (``image-label`` metadata), scale and translation from the image's geometry (see
    :mod:`napari_medsam.io.ome_zarr`).
    """
    import re

    from . import _layers
    from .core.errors import MedSamError
    from .io import ImageVolume
    from .io.ome_zarr import write_ome_zarr

    images = [(d, a) for d, a, kind in layer_data if kind == "image"]
    labels = [(d, a) for d, a, kind in layer_data if kind == "labels"]
    if len(images) != 1:
        raise MedSamError(f"select one Image layer (and its Labels layers) to save as OME-Zarr; got {len(images)}")
    data, attrs = images[0]
    data = data[0] if isinstance(data, (list, tuple)) else data  # a multiscale layer: its full resolution
    ref = _layers.layer_reference(attrs, tuple(np.shape(data)))
    image = ImageVolume(data=np.asarray(data), spacing=ref.spacing, origin=ref.origin, affine=ref.affine)
    arrays: dict[str, Any] = {}
    for lab, lab_attrs in labels:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(lab_attrs.get("name") or "labels")).strip("._") or "labels"
        arrays[name if name not in arrays else f"{name}_{len(arrays)}"] = np.asarray(lab)
    return [os.fspath(write_ome_zarr(path, image, arrays))]
