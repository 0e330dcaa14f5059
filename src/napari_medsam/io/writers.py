"""Write label arrays and images with the geometry of the image they were drawn on.

The format follows the extension, as for :func:`read_image`. With a ``reference``
:class:`ImageVolume` the output keeps its geometry: a NIfTI reference's header is copied (affine,
qform / sform and their codes, zooms, units), other formats store spacing, origin and the affine
in their own metadata. Every write is atomic: the data go to a hidden temporary sibling
(``.NAME.tmp-XXXXXXXX.EXT``) that is renamed over the target only once complete, so a crash or an
error never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_medsam.core.errors import InvalidImageError, MedSamError
from napari_medsam.io.readers import SUPPORTED_EXTENSIONS, image_format, split_extension
from napari_medsam.io.volume import ImageVolume

__all__ = ["write_image", "write_labels"]

# dtypes ImageJ hyperstacks hold natively; others are written as plain (shaped) TIFF
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
_MAX_CHUNK = 4096  # longest chunk side of a zarr slice; larger 2D planes are tiled


@dataclass(frozen=True)
class _Geometry:
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    affine: np.ndarray | None
    reference: ImageVolume | None

    def affine_or_diagonal(self) -> np.ndarray:
        """The reference affine, else one built from spacing and origin (identity by default)."""
        if self.affine is not None:
            return np.array(self.affine, dtype=float)
        affine = np.eye(4)
        for i, (s, o) in enumerate(zip(self.spacing, self.origin, strict=True)):
            affine[i, i] = s
            affine[i, 3] = o
        return affine


def write_labels(
    path: str | os.PathLike,
    labels: Any,
    *,
    reference: ImageVolume | None = None,
    name: str = "labels",
) -> pathlib.Path:
    """Write an integer label array; returns the written path.

    Parameters
    ----------
    path
        Target file; its extension picks the format (``.nii``, ``.nii.gz``, ``.tif``, ``.tiff``,
        ``.npy``, ``.zarr``, ``.ome.zarr``). Missing parent folders are created; an existing file
        or store is replaced.
    labels
        ``(H, W)`` or ``(D, H, W)`` non-negative integers (or booleans), 0 = background. Stored as
        ``uint8`` when the largest label is below 256, else ``uint16`` or ``uint32``.
    reference
        The image the labels were drawn on. Its spatial shape must equal ``labels.shape``; its
        geometry (NIfTI header, spacing, origin, affine) is written with the labels.
    name
        Name stored in the OME-Zarr metadata and the NIfTI description.

    Raises
    ------
    InvalidImageError
        Labels that are not integers, negative, too large, empty, not 2D / 3D, or of another shape
        than the reference.
    MedSamError
        An unsupported extension.
    """
    array = np.asarray(labels)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype.kind not in "iu":
        raise InvalidImageError(
            f"Labels must be an integer array, got dtype {array.dtype}. "
            "Round and cast probability maps first (e.g. `(prob > 0.5).astype(np.uint8)`), "
            "or save them with `write_image`."
        )
    _check_array(array, reference, "labels")
    lo, hi = (int(array.min()), int(array.max()))
    if lo < 0:
        raise InvalidImageError(f"Labels must be >= 0 (0 = background), got a minimum of {lo}.")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if hi <= np.iinfo(dtype).max:
            array = array.astype(dtype, copy=False)
            break
    else:
        raise InvalidImageError(f"Label value {hi} does not fit in uint32; renumber the labels.")
    return _write(path, array, reference, kind="labels", name=name)


def write_image(
    path: str | os.PathLike,
    data: Any,
    *,
    reference: ImageVolume | None = None,
) -> pathlib.Path:
    """Write a float or integer image (e.g. a probability map); returns the written path.

    Same formats, geometry and atomicity as :func:`write_labels`, without the label metadata. The
    dtype is kept where the format allows (booleans become ``uint8``, ``float16`` becomes
    ``float32``; TIFF dtypes ImageJ cannot hold are written as plain TIFF).
    """
    array = np.asarray(data)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    if array.dtype.kind not in "iuf":
        raise InvalidImageError(f"Images must be integer or float arrays, got dtype {array.dtype}.")
    _check_array(array, reference, "image")
    return _write(path, array, reference, kind="image", name="image")


def _check_array(array: np.ndarray, reference: ImageVolume | None, what: str) -> None:
    if reference is not None:
        if not isinstance(reference, ImageVolume):
            raise InvalidImageError(f"reference must be an ImageVolume, got {type(reference).__name__}.")
        if tuple(array.shape) != reference.spatial_shape:
            raise InvalidImageError(
                f"The {what} have shape {tuple(array.shape)} but the reference image "
                f"{reference.source or ''} has shape {reference.spatial_shape}; they must match voxel "
                "for voxel. Write the array drawn on this image, or pass its own reference."
            )
    if array.size == 0:
        raise InvalidImageError(f"The {what} are empty: shape {tuple(array.shape)}.")
    if array.ndim not in (2, 3):
        raise InvalidImageError(
            f"The {what} have shape {tuple(array.shape)}: a 2D (H, W) or 3D (D, H, W) array is needed."
        )


def _geometry(array: np.ndarray, reference: ImageVolume | None) -> _Geometry:
    if reference is None:
        return _Geometry((1.0,) * array.ndim, (0.0,) * array.ndim, None, None)
    return _Geometry(reference.spacing, reference.origin, reference.affine, reference)


def _write(
    path: str | os.PathLike, array: np.ndarray, reference: ImageVolume | None, *, kind: str, name: str
) -> pathlib.Path:
    path = pathlib.Path(os.fspath(path)).expanduser()
    ext = split_extension(path)[1]
    fmt = image_format(path) if ext else None
    if fmt is None:
        raise MedSamError(
            f"Cannot write {path}: unsupported extension {ext or '(none)'!r}. "
            f"Use one of {', '.join(SUPPORTED_EXTENSIONS)} (or .ome.zarr)."
        )
    geometry = _geometry(array, reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zarr":
        with _atomic_dir(path) as tmp:
            _write_ome_zarr(tmp, array, geometry, kind=kind, name=name)
        return path
    writer = {"nifti": _write_nifti, "tiff": _write_tiff, "npy": _write_npy}[fmt]
    with _atomic_file(path) as tmp:
        writer(tmp, array, geometry, kind=kind, name=name)
    return path


# ---- atomic replacement -----------------------------------------------------------------------


def _temp_sibling(path: pathlib.Path, tag: str) -> pathlib.Path:
    stem, ext = split_extension(path)
    return path.with_name(f".{stem}.{tag}-{secrets.token_hex(4)}{ext}")


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _atomic_file(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling with the same extension; rename it over ``path`` on success."""
    tmp = _temp_sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def _atomic_dir(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling folder; swap it in for ``path`` (file or folder) on success."""
    tmp = _temp_sibling(path, "tmp")
    try:
        yield tmp
        if os.path.lexists(path):
            old = _temp_sibling(path, "old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


# ---- formats ----------------------------------------------------------------------------------


def _medsam_meta(geometry: _Geometry, kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "spacing": [float(s) for s in geometry.spacing],
        "origin": [float(o) for o in geometry.origin],
        "affine": None if geometry.affine is None else np.asarray(geometry.affine, dtype=float).tolist(),
    }


def _write_nifti(tmp: pathlib.Path, array: np.ndarray, geometry: _Geometry, *, kind: str, name: str) -> None:
    import nibabel as nib

    ref = geometry.reference
    header = ref.meta.get("nifti_header") if ref is not None else None
    if isinstance(header, nib.Nifti1Header) and geometry.affine is not None:
        # Copy the reference header: qform / sform with their codes, zooms, units, dim_info stay.
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = image_class(array, np.asarray(geometry.affine, dtype=float), header=header.copy())
    else:
        img = nib.Nifti1Image(array, geometry.affine_or_diagonal())
    img.set_data_dtype(array.dtype)
    hdr = img.header
    hdr.set_slope_inter(None, None)  # the reference's intensity scaling must not apply to labels
    hdr["cal_min"] = 0
    hdr["cal_max"] = 0
    hdr.set_intent("label" if kind == "labels" else "none")
    hdr["descrip"] = f"napari-medsam {name}"[:79].encode("ascii", "replace")
    img.to_filename(tmp)


def _write_tiff(tmp: pathlib.Path, array: np.ndarray, geometry: _Geometry, *, kind: str, name: str) -> None:
    import tifffile

    spacing = geometry.spacing
    axes = "ZYX" if array.ndim == 3 else "YX"
    ours = json.dumps(_medsam_meta(geometry, kind))
    big = array.nbytes > 2**32 - 2**25  # ImageJ hyperstacks cannot be BigTIFF
    imagej = array.dtype in _IMAGEJ_DTYPES and not big
    metadata: dict[str, Any] = {"axes": axes, "napari_medsam": ours}
    if imagej and array.ndim == 3:
        metadata["spacing"] = float(spacing[0])
    tifffile.imwrite(
        tmp,
        array,
        imagej=imagej,
        bigtiff=big,
        resolution=(1.0 / spacing[-1], 1.0 / spacing[-2]),
        metadata=metadata,
        compression="zlib",
    )


def _write_npy(tmp: pathlib.Path, array: np.ndarray, geometry: _Geometry, *, kind: str, name: str) -> None:
    with open(tmp, "xb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def _write_ome_zarr(
    tmp: pathlib.Path, array: np.ndarray, geometry: _Geometry, *, kind: str, name: str
) -> None:
    """An OME-NGFF 0.4 image group (zarr format 2) with one resolution level, array ``"0"``."""
    import zarr

    plane = tuple(min(s, _MAX_CHUNK) for s in array.shape[-2:])
    chunks = (1, *plane) if array.ndim == 3 else plane
    group = zarr.open_group(str(tmp), mode="w-", zarr_format=2)
    dataset = group.create_array(
        "0",
        shape=array.shape,
        dtype=array.dtype,
        chunks=chunks,
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )
    dataset[...] = array
    names = ("z", "y", "x")[-array.ndim :]
    attrs: dict[str, Any] = {
        "multiscales": [
            {
                "version": "0.4",
                "name": name,
                "axes": [{"name": n, "type": "space"} for n in names],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [float(s) for s in geometry.spacing]},
                            {"type": "translation", "translation": [float(o) for o in geometry.origin]},
                        ],
                    }
                ],
            }
        ],
        "napari_medsam": _medsam_meta(geometry, kind),
    }
    if kind == "labels":
        attrs["image-label"] = {"version": "0.4"}
    group.attrs.update(attrs)
