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


PLUGIN_NAME = "napari-medsam"
GENERIC_PATTERNS = ("*.tif", "*.tiff", "*.npy", "*.zarr")  # not medical: other plugins' users open these too


def reader_patterns() -> tuple[str, ...]:
    """The filename patterns our reader contribution claims (from the installed manifest)."""
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution(PLUGIN_NAME)
    return tuple(p for r in manifest.contributions.readers or () for p in r.filename_patterns)


def prefer_our_reader(settings: Any = None, *, patterns: Sequence[str] | None = None,
                      directories: bool = False) -> dict[str, str]:
    """Make napari open our formats with this plugin without asking which reader to use.

    napari shows its reader dialog whenever more than one reader claims a path and the user has no
    preference for it (``settings.plugins.extension2reader``, what the dialog's "remember" box
    writes); napari's own builtin reader claims ``*.nii``, ``*.nii.gz``, ``*.nrrd``, ``*.mha``,
    ``*.dcm``, ``*.tif``, ``*.npy`` and ``*.zarr`` too, so every scan asks. This fills in a
    preference for each of our ``patterns`` (default: the manifest's medical formats, not
    :data:`GENERIC_PATTERNS`) that the user has not set; a choice the user made is never replaced. ``directories``: also claim folders (``*/``: DICOM
    series), which takes folders from every other reader, so only on request.
    Returns the preferences added. napari saves its settings itself.
    """
    if settings is None:
        from napari.settings import get_settings

        settings = get_settings()
    wanted = list(patterns if patterns is not None else
                  (p for p in reader_patterns() if p not in GENERIC_PATTERNS))
    if directories:
        wanted.append("*" + os.sep)
    current = dict(settings.plugins.extension2reader)
    added = {p: PLUGIN_NAME for p in wanted if p not in current}
    if added:
        settings.plugins.extension2reader = {**current, **added}
    return added
