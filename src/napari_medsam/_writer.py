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
