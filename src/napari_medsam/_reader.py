"""npe2 reader: NIfTI, TIFF, zarr / OME-Zarr, ``.npy`` and DICOM series as napari layers with their geometry.

Voxel spacing becomes the layer's ``scale`` and the origin its ``translate``; the NIfTI affine and
header stay in ``layer.metadata`` (see :mod:`napari_medsam._layers`), so that labels drawn on the
layer can be written back with the exact geometry of the scan. Files written by our own writers as
labels (NIfTI intent ``label``, OME-Zarr ``image-label``, our TIFF metadata) open as Labels layers.

No Qt and no torch here; nibabel, tifffile and zarr load when a file of their format is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

PathLike = str | os.PathLike
LayerData = tuple[Any, dict[str, Any], str]

NIFTI_INTENT_LABEL = 1002


def get_reader(path: PathLike | Sequence[PathLike]) -> Callable[[Any], list[LayerData]] | None:
    """The reader function for ``path`` (or a list of paths) when every path is a format we read."""
    from .io import image_format
    from .io.dicom import is_dicom_path

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or any(image_format(os.fspath(p)) is None and not is_dicom_path(p) for p in paths):
        return None
    return read_layers


def read_layers(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Read one file or several into napari layer data tuples ``(data, kwargs, layer_type)``."""
    from .io import image_format
    from .io.dicom import is_dicom_path, list_series, split_series

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out = []
    for p in map(os.fspath, paths):
        if image_format(p) is None and is_dicom_path(p) and split_series(p)[1] is None:
            series = list_series(p)  # a folder of several DICOM series: one layer each
            out.extend(_read_one(f"{p}::{s.uid}" if len(series) > 1 else p) for s in series)
        else:
            out.append(_read_one(p))
    return out


def _read_one(path: str) -> LayerData:
    from . import _layers
    from .io import read_image

    # Compressed NIfTI cannot be read slice by slice cheaply: load it. Memory maps and zarr stay lazy.
    lazy = not path.lower().endswith(".gz")
    volume = read_image(path, lazy=lazy)
    if _is_labels(volume):
        return _layers.labels_layer_data(volume)
    return _layers.image_layer_data(volume)


def _is_labels(volume: Any) -> bool:
    meta = volume.meta
    header = meta.get("nifti_header")
    if header is not None:
        try:
            if int(header["intent_code"]) == NIFTI_INTENT_LABEL:
                return True
        except (KeyError, TypeError, ValueError):
            pass
    if meta.get("image-label"):
        return True
    ours = meta.get("napari_medsam")
    return isinstance(ours, dict) and ours.get("kind") == "labels"
