"""Export a label array drawn on a DICOM series as a DICOM Segmentation object (DICOM-SEG).

Written with highdicom, for PACS users: one BINARY segment per class, each frame referencing the
source slice it was drawn on (so a viewer overlays it on that series). The label array is in the
``(slice, row, column)`` order :func:`napari_medsam.io.dicom.read_dicom` gives; its slices map to
the reference's sorted source files (``reference.meta["dicom_files"]``). Frames without any label
are omitted, as highdicom does by default.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_medsam import __version__
from napari_medsam.core.errors import InvalidImageError
from napari_medsam.io.volume import ImageVolume

__all__ = ["write_dicom_seg"]


def write_dicom_seg(
    path: str | os.PathLike,
    labels: Any,
    *,
    reference: ImageVolume,
    class_names: Sequence[str] | None = None,
    class_ids: Sequence[int] | None = None,
    algorithm: str = "napari-medsam",
    series_description: str = "napari-medsam segmentation",
) -> pathlib.Path:
    """Write ``labels`` (same shape as ``reference``) as a DICOM-SEG file; returns the path.

    ``class_ids``: the label values to export, one segment each, in this order (default: every
    non-zero value present); ``class_names`` their segment labels (default ``class <id>``).
    The file is written to a temporary sibling and renamed into place.

    Raises :class:`InvalidImageError` when the reference is not a single-frame DICOM series read
    by :func:`~napari_medsam.io.dicom.read_dicom`, the shapes differ, or there is nothing to export.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files = reference.meta.get("dicom_files") if isinstance(reference, ImageVolume) else None
    if not files or reference.meta.get("dicom", {}).get("multiframe"):
        raise InvalidImageError(
            "DICOM-SEG export needs the labels' reference to be a single-frame DICOM series read by "
            "napari-medsam (a folder of slices); save NIfTI or OME-Zarr labels for other images."
        )
    array = np.asarray(labels)
    if array.shape != reference.spatial_shape:
        raise InvalidImageError(
            f"The labels have shape {array.shape} but the DICOM series has {reference.spatial_shape}."
        )
    if array.dtype.kind not in "biu":
        raise InvalidImageError(f"Labels must be integers, got dtype {array.dtype}.")
    ids = [int(v) for v in (class_ids if class_ids is not None else np.unique(array)) if int(v) != 0]
    if not ids:
        raise InvalidImageError("The labels are all background (0): there is no segment to export.")
    names = list(class_names) if class_names is not None else [f"class {i}" for i in ids]
    if len(names) != len(ids):
        raise InvalidImageError(f"{len(names)} class names for {len(ids)} classes {ids}.")
    # segment numbers must run 1..K: map each exported label value to its position
    lut = np.zeros(int(max(int(array.max()), *ids)) + 1, dtype=np.uint16)
    for number, value in enumerate(ids, start=1):
        lut[value] = number
    label_map = lut[array.astype(np.int64)]
    sources = [pydicom.dcmread(f) for f in files]
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(name)[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=algorithm[:64], version=__version__, family=codes.DCM.ArtificialIntelligence
            ),
        )
        for number, name in enumerate(names, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=label_map.astype(np.uint8 if len(ids) < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-medsam",
        manufacturer_model_name="napari-medsam",
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description[:64],
    )
    out = pathlib.Path(os.fspath(path)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        seg.save_as(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
