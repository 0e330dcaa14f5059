"""Write label arrays and images with the geometry of the image they were drawn on.

The format follows the extension, as for :func:`read_image`. With a ``reference``
:class:`ImageVolume` the output keeps its geometry: a NIfTI reference's header is copied (affine,
qform / sform and their codes, zooms, units), other formats store spacing, origin and the affine
in their own metadata. Every write is atomic: the data go to a hidden temporary sibling
(``.NAME.tmp-PID-XXXXXXXX.EXT``) that is renamed over the target only once complete, so a crash or an
error never leaves a half-written file in place of the target; a later write removes such leftovers
of dead writers (:func:`remove_stale_temps`). :func:`check_output` refuses, before any work, an
output that would destroy an input or a user file.
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

from napari_medsam.core.errors import InvalidImageError, OutputError
from napari_medsam.io.readers import WRITABLE_FORMATS, image_format, split_extension
from napari_medsam.io.volume import ImageVolume

__all__ = ["check_output", "remove_stale_temps", "write_image", "write_labels"]

#: Our temporary files older than this many minutes are removed even when their writer's PID is unknown.
STALE_MINUTES = 60
_TMP_TAG = "tmp"
#: Extensions :func:`write_labels` and :func:`write_image` write (other readable formats are read only).
WRITABLE_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz", ".tif", ".tiff", ".npy", ".zarr")

# dtypes ImageJ hyperstacks hold natively; others are written as plain (shaped) TIFF
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


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
        or store is replaced (never a read-only file, a folder that is not a store, or a file by a
        store: see :func:`check_output`, which the CLI calls with ``overwrite=False`` first).
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
    if fmt not in WRITABLE_FORMATS:
        raise OutputError(
            f"Cannot write {path}: unsupported extension {ext or '(none)'!r} for an output. "
            f"Use one of {', '.join(WRITABLE_EXTENSIONS)} (or .ome.zarr)."
        )
    geometry = _geometry(array, reference)
    check_output(path, overwrite=True)  # never a read-only file, a folder for a file, or x.zarr-the-file
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zarr":
        with _atomic_dir(path) as tmp:
            _write_ome_zarr(tmp, array, geometry, kind=kind, name=name)
        return path
    writer = {"nifti": _write_nifti, "tiff": _write_tiff, "npy": _write_npy}[fmt]
    with _atomic_file(path) as tmp:
        writer(tmp, array, geometry, kind=kind, name=name)
    return path


# ---- output checks: before any work ------------------------------------------------------------


def _name_max(folder: pathlib.Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # Windows has no pathconf
        return 255


def _is_zarr_store(path: pathlib.Path) -> bool:
    return any((path / n).is_file() for n in ("zarr.json", ".zgroup", ".zarray"))


def _probe_folder(folder: pathlib.Path) -> None:
    """Create and remove a file in ``folder``: the only writability test that also holds for root."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".napari-medsam-probe-", dir=folder)
    except OSError as e:
        raise OutputError(f"cannot write into {folder} ({e.strerror or e}) — choose a folder you can write to") from e
    os.close(fd)
    os.unlink(name)


def check_output(
    path: str | os.PathLike,
    *,
    inputs: Any = (),
    overwrite: bool = False,
    kind: str = "image",
) -> pathlib.Path:
    """Check, before any work starts, that ``path`` can be written without destroying anything.

    Refused with :class:`OutputError`: an output that is one of ``inputs`` (same resolved path or
    same file); an existing output unless ``overwrite``; an existing read-only or immutable file
    (even with ``overwrite``); a folder where a file is to go, or a plain file named like a zarr
    store (``x.zarr`` is never replaced by a folder); a folder that is not a zarr store where a
    zarr store is to go; a parent that is a file or not writable; a name longer than the file
    system allows (counting our temporary sibling's name). ``kind="image"`` also checks the
    extension (one :func:`write_labels` writes); ``kind="file"`` (heads, tables) does not.
    Stale temporary files of ours next to ``path`` are removed (:func:`remove_stale_temps`).
    Returns the expanded path.
    """
    path = pathlib.Path(os.fspath(path)).expanduser()
    fmt = image_format(path) if kind == "image" else None
    if kind == "image" and fmt not in WRITABLE_FORMATS:
        ext = split_extension(path)[1]
        raise OutputError(
            f"cannot write {path}: unsupported extension {ext or '(none)'!r} for an output — use one of "
            f"{', '.join(WRITABLE_EXTENSIONS)} (or .ome.zarr)")
    target = os.path.abspath(path)
    for src in inputs if isinstance(inputs, (list, tuple, set)) else (inputs,):
        if src is None:
            continue
        same = os.path.realpath(target) == os.path.realpath(os.fspath(src))
        if not same:
            try:
                same = os.path.samefile(target, src)
            except OSError:
                same = False
        if same:
            raise OutputError(f"the output {path} is the input {src}: it would be destroyed — choose another "
                              "output name")
    if os.path.lexists(path):
        is_dir = path.is_dir()
        if fmt == "zarr" and not is_dir:
            raise OutputError(f"{path} exists and is a file, not a zarr folder: it is not replaced by a store — "
                              "choose another output name or remove it yourself")
        if is_dir and fmt != "zarr":
            raise OutputError(f"{path} is a folder: a file cannot replace it — choose another output name")
        if is_dir and not _is_zarr_store(path):
            raise OutputError(f"{path} is a folder that is not a zarr store: it is not replaced — choose another "
                              "output name")
        if not is_dir:
            if not os.stat(path).st_mode & 0o222:
                raise OutputError(f"{path} exists and is read-only: it is not replaced — choose another output "
                                  "name, or make it writable if it should be replaced")
            try:  # an immutable file (chattr +i) refuses even root; O_WRONLY without O_TRUNC changes nothing
                os.close(os.open(path, os.O_WRONLY))
            except OSError as e:
                raise OutputError(f"{path} cannot be replaced ({e.strerror or e}) — choose another output name") from e
        if not overwrite:
            raise OutputError(f"{path} already exists — pass --overwrite to replace it, or choose another name")
    parent = path.parent
    ancestor = parent
    while not ancestor.exists():
        if os.path.lexists(ancestor):  # a dangling link
            raise OutputError(f"{ancestor} is a broken link — choose another output folder")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{ancestor} is a file, not a folder: {path} cannot be created in it — choose another "
                          "output path")
    stem, ext = split_extension(path)
    longest = max(len(path.name), len(f".{stem}.{_TMP_TAG}-{os.getpid()}-xxxxxxxx{ext}"))
    if longest > _name_max(ancestor):
        raise OutputError(f"the output name {path.name[:40]}... is {len(path.name)} characters, too long for this "
                          f"file system (at most {_name_max(ancestor) - (longest - len(path.name))} here) — "
                          "choose a shorter name")
    _probe_folder(ancestor)
    if parent.is_dir():
        remove_stale_temps(path)
    return path


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs; None when that cannot be told."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with napari
        return None
    return bool(psutil.pid_exists(pid))


def remove_stale_temps(path: str | os.PathLike, *, minutes: float = STALE_MINUTES) -> list[pathlib.Path]:
    """Remove our own leftover temporary siblings of ``path`` (``.NAME.tmp-PID-XXXXXXXX.EXT``).

    A writer killed mid-write (``kill -9``, power loss) leaves one behind. Removed: those whose
    writer PID no longer runs, and any older than ``minutes`` (names without a PID, or a PID
    reused by another process). Other files are never touched. Returns what was removed.
    """
    import re
    import time

    path = pathlib.Path(os.fspath(path)).expanduser()
    stem, ext = split_extension(path)
    removed = []
    pattern = re.compile(r"^\.(?:" + re.escape(stem) + "|" + re.escape(path.name) + r")\." + _TMP_TAG
                         + r"-(?:(\d+)-)?[0-9a-f]+")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        tmp = path.parent / name
        pid = int(m.group(1)) if m.group(1) else None
        try:
            age_min = (now - tmp.lstat().st_mtime) / 60
        except OSError:
            continue
        dead = pid is not None and pid != os.getpid() and _pid_alive(pid) is False
        if dead or age_min > minutes:
            _remove(tmp)
            removed.append(tmp)
    return removed


# ---- atomic replacement -----------------------------------------------------------------------


def _temp_sibling(path: pathlib.Path, tag: str) -> pathlib.Path:
    stem, ext = split_extension(path)
    return path.with_name(f".{stem}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{ext}")


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
    """An OME-NGFF 0.4 multiscale (zarr format 2, ome-zarr-py) at the store's root: the first
    level (``multiscales[0].datasets[0].path``) is ``array`` as given, coarser levels halve the in-plane size (:mod:`napari_medsam.io.ome_zarr`);
    labels carry ``image-label`` metadata (a colour and a class name per value)."""
    from napari_medsam.io.ome_zarr import image_label_metadata, write_pyramid

    write_pyramid(tmp, array, spacing=geometry.spacing, origin=geometry.origin, name=name,
                  meta=_medsam_meta(geometry, kind),
                  labels=image_label_metadata(array) if kind == "labels" else None)
