"""Read DICOM series (a folder of slices, or one multi-frame file) into :class:`ImageVolume`.

Built on pydicom; nothing is hand-parsed. A folder is searched recursively; files that are not
DICOM (or hold no pixel data, e.g. a ``DICOMDIR``) are ignored. Its image files are grouped by
``SeriesInstanceUID``; slices are sorted by their ``ImagePositionPatient`` projected on the slice
normal (the cross product of the two ``ImageOrientationPatient`` directions), never by file name
or ``InstanceNumber``.

The array is ``(slice, row, column)``. The affine follows the NIfTI convention of
:mod:`napari_medsam.io.volume`: array index ``(k, r, c)`` to RAS+ world millimetres (DICOM's LPS
x and y negated), so a label array drawn on it and written as NIfTI lands where the scan is.
``spacing`` is ``(slice spacing, row spacing, column spacing)`` and ``origin`` the RAS position of
voxel ``(0, 0, 0)``. ``RescaleSlope`` / ``RescaleIntercept`` are applied (CT in Hounsfield units):
integer results stay integer, fractional ones become float32.

Several series in one folder: :func:`list_series` lists them; pick one with ``series=`` (its
``SeriesInstanceUID`` or its index in that list) or with the path form ``FOLDER::SERIES``.
Pixel data stay on disk until indexed; a slice read opens one file, so a 512-slice CT is never
held whole unless asked for.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_medsam.core.errors import ImageReadError, InvalidImageError
from napari_medsam.io.volume import ImageVolume, LazyArray

__all__ = ["SeriesInfo", "is_dicom_path", "list_series", "read_dicom", "split_series"]

SERIES_SEPARATOR = "::"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_SPACING_TOLERANCE = 0.01  # relative spread of slice gaps accepted as one spacing


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found in a folder: its UID, what it is, and its files (unsorted)."""

    uid: str
    description: str
    modality: str
    files: tuple[str, ...]
    frames: int

    def label(self) -> str:
        text = f"{self.modality or '?'} {self.description!r}" if self.description else self.modality or "?"
        return f"{text}, {self.frames} slice(s), SeriesInstanceUID {self.uid}"


def split_series(path: str | os.PathLike) -> tuple[pathlib.Path, str | None]:
    """``"DIR::2"`` -> ``(Path("DIR"), "2")``; a path without the separator -> ``(path, None)``."""
    text = os.fspath(path)
    if SERIES_SEPARATOR in text:
        head, _, tail = text.rpartition(SERIES_SEPARATOR)
        if head and tail:
            return pathlib.Path(head).expanduser(), tail
    return pathlib.Path(text).expanduser(), None


def _has_preamble(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _looks_dicom(path: pathlib.Path) -> bool:
    return path.suffix.lower() in _DICOM_SUFFIXES or _has_preamble(path)


def is_dicom_path(path: str | os.PathLike) -> bool:
    """True for a DICOM file, a folder holding DICOM files (not a zarr store), or ``DIR::SERIES``.

    Cheap: it looks at file names and the 4-byte ``DICM`` marker of at most a few files.
    """
    p, series = split_series(path)
    if p.is_file():
        return _looks_dicom(p)
    if not p.is_dir() or p.name.lower().endswith(".zarr"):
        return False
    if series is not None:
        return True
    for n, f in enumerate(_walk(p)):
        if _looks_dicom(f):
            return True
        if n >= 32:
            break
    return False


def _walk(folder: pathlib.Path) -> Any:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield pathlib.Path(root) / name


def _read_header(path: pathlib.Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=path.suffix.lower() in _DICOM_SUFFIXES)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _is_image(ds: Any) -> bool:
    return ds is not None and "Rows" in ds and "Columns" in ds and "SeriesInstanceUID" in ds


def list_series(path: str | os.PathLike) -> list[SeriesInfo]:
    """The image series in a DICOM folder (or the one in a file), largest first, then by UID.

    Raises :class:`ImageReadError` when no DICOM image is found.
    """
    p, _ = split_series(path)
    if not p.exists():
        raise ImageReadError(f"DICOM path not found: {p}")
    files = [p] if p.is_file() else [f for f in _walk(p) if f.is_file()]
    groups: dict[str, dict[str, Any]] = {}
    for f in files:
        ds = _read_header(f)
        if not _is_image(ds):
            continue
        uid = str(ds.SeriesInstanceUID)
        g = groups.setdefault(uid, {"files": [], "frames": 0, "ds": ds})
        g["files"].append(str(f))
        g["frames"] += int(getattr(ds, "NumberOfFrames", 1) or 1)
    if not groups:
        raise ImageReadError(
            f"No DICOM image found in {p}: no file there holds Rows, Columns and a SeriesInstanceUID. "
            "Point at the folder of one series (or a multi-frame .dcm file)."
        )
    out = [
        SeriesInfo(uid=uid, description=str(getattr(g["ds"], "SeriesDescription", "") or ""),
                   modality=str(getattr(g["ds"], "Modality", "") or ""), files=tuple(g["files"]),
                   frames=int(g["frames"]))
        for uid, g in groups.items()
    ]
    out.sort(key=lambda s: (-s.frames, s.uid))
    return out


def _choose(series: Sequence[SeriesInfo], choice: str | int | None, where: pathlib.Path) -> SeriesInfo:
    if choice is None:
        if len(series) == 1:
            return series[0]
        listing = "; ".join(f"[{i}] {s.label()}" for i, s in enumerate(series))
        raise InvalidImageError(
            f"{where} holds {len(series)} DICOM series: {listing}. Choose one by index or UID, "
            f"e.g. `{where}{SERIES_SEPARATOR}0` (napari opens each series as its own layer)."
        )
    text = str(choice)
    for s in series:
        if s.uid == text:
            return s
    if text.lstrip("-").isdigit() and -len(series) <= int(text) < len(series):
        return series[int(text)]
    raise InvalidImageError(
        f"{where} has no DICOM series {text!r}; it holds "
        + "; ".join(f"[{i}] {s.label()}" for i, s in enumerate(series))
    )


# ---- geometry ---------------------------------------------------------------------------------


def _floats(value: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as e:
        raise InvalidImageError(f"{where}: {what} is missing or not numeric ({value!r}).") from e
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InvalidImageError(f"{where}: {what} must hold {n} finite numbers, got {value!r}.")
    return out


@dataclass(frozen=True)
class _Plane:
    position: np.ndarray  # LPS mm of the first pixel's centre
    row_dir: np.ndarray  # LPS unit vector along a row (column index increasing)
    col_dir: np.ndarray  # LPS unit vector along a column (row index increasing)
    pixel_spacing: np.ndarray  # (between rows, between columns) mm
    thickness: float | None


def _plane_from(position: Any, orientation: Any, spacing: Any, thickness: Any, where: str) -> _Plane:
    ipp = _floats(position, 3, "ImagePositionPatient", where)
    iop = _floats(orientation, 6, "ImageOrientationPatient", where)
    row, col = iop[:3], iop[3:]
    if not (np.isclose(np.linalg.norm(row), 1, atol=1e-3) and np.isclose(np.linalg.norm(col), 1, atol=1e-3)
            and abs(float(row @ col)) < 1e-3):
        raise InvalidImageError(f"{where}: ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors.")
    ps = _floats(spacing, 2, "PixelSpacing", where)
    if np.any(ps <= 0):
        raise InvalidImageError(f"{where}: PixelSpacing must be positive, got {list(ps)}.")
    th = None
    if thickness is not None:
        try:
            th = float(thickness)
        except (TypeError, ValueError):
            th = None
    return _Plane(ipp, row / np.linalg.norm(row), col / np.linalg.norm(col), ps, th if th and th > 0 else None)


def _affine(planes: Sequence[_Plane], slice_step: float, normal: np.ndarray) -> np.ndarray:
    """Index ``(k, r, c)`` -> RAS+ mm."""
    p0 = planes[0]
    lps = np.eye(4)
    lps[:3, 0] = normal * slice_step
    lps[:3, 1] = p0.col_dir * p0.pixel_spacing[0]
    lps[:3, 2] = p0.row_dir * p0.pixel_spacing[1]
    lps[:3, 3] = p0.position
    out = np.eye(4)
    out[:3, :] = _LPS_TO_RAS @ lps[:3, :]
    return out


def _sorted_geometry(planes: list[_Plane], where: str, fallback_step: float | None) -> tuple[np.ndarray, float, np.ndarray]:
    """Order of the planes along the normal, the slice spacing and the normal."""
    p0 = planes[0]
    for p in planes[1:]:
        if not (np.allclose(p.row_dir, p0.row_dir, atol=1e-3) and np.allclose(p.col_dir, p0.col_dir, atol=1e-3)):
            raise InvalidImageError(
                f"{where}: the slices have different ImageOrientationPatient (a localizer or a "
                "reformatted series mixed in?); separate them into their own folders."
            )
        if not np.allclose(p.pixel_spacing, p0.pixel_spacing, rtol=1e-4):
            raise InvalidImageError(f"{where}: the slices have different PixelSpacing; it is not one volume.")
    normal = np.cross(p0.row_dir, p0.col_dir)
    depth = np.array([float(p.position @ normal) for p in planes])
    order = np.argsort(depth, kind="stable")
    if len(planes) == 1:
        step = fallback_step or p0.thickness or 1.0
        return order, float(step), normal
    gaps = np.diff(depth[order])
    if np.any(gaps < 1e-6):
        raise InvalidImageError(
            f"{where}: {int(np.sum(gaps < 1e-6)) + 1} slices share a position along the slice normal "
            "(duplicates, several echoes or time points in one series); keep one volume per folder."
        )
    step = float(np.median(gaps))
    if np.max(np.abs(gaps - step)) > _SPACING_TOLERANCE * step + 1e-3:
        raise InvalidImageError(
            f"{where}: the slice gaps are uneven ({gaps.min():.4g} to {gaps.max():.4g} mm): missing "
            "slices or a variable-spacing acquisition. Resample it first (e.g. `dcm2niix`, which "
            "reports such gaps) or re-export the complete series."
        )
    return order, step, normal


# ---- pixel data ---------------------------------------------------------------------------------


def _rescale(ds: Any) -> tuple[float, float]:
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return slope, inter


def _out_dtype(stored: np.dtype, rescales: Sequence[tuple[float, float]]) -> np.dtype:
    if all(s == 1.0 and i == 0.0 for s, i in rescales):
        return np.dtype(stored)
    if all(float(s).is_integer() and float(i).is_integer() for s, i in rescales):
        info = np.iinfo(stored) if stored.kind in "iu" else None
        if info is not None:
            ends = [info.min * s + i for s, i in rescales] + [info.max * s + i for s, i in rescales]
            for dt in (np.int16, np.int32):
                if np.iinfo(dt).min <= min(ends) and max(ends) <= np.iinfo(dt).max:
                    return np.dtype(dt)
    return np.dtype(np.float32)


class _SeriesStack:
    """``(n_slices, rows, cols)`` over sorted single-frame files; each index reads only its slices."""

    def __init__(self, files: Sequence[str], rescales: Sequence[tuple[float, float]], shape: tuple[int, int, int],
                 dtype: np.dtype) -> None:
        self._files = list(files)
        self._rescales = list(rescales)
        self.shape = shape
        self.dtype = dtype

    def _slice(self, i: int) -> np.ndarray:
        import pydicom

        ds = pydicom.dcmread(self._files[i])
        pixels = np.asarray(ds.pixel_array)
        if pixels.shape != self.shape[1:]:
            raise ImageReadError(
                f"{self._files[i]} holds a {pixels.shape} image, the series {self.shape[1:]}; it is not one volume."
            )
        slope, inter = self._rescales[i]
        if slope != 1.0 or inter != 0.0:
            pixels = pixels.astype(np.float64) * slope + inter
        return pixels.astype(self.dtype, copy=False)

    def __getitem__(self, key: tuple) -> np.ndarray:
        first, rest = key[0], key[1:]
        if isinstance(first, (int, np.integer)):
            return self._slice(int(first) % self.shape[0])[rest]
        picked = np.arange(self.shape[0])[first]
        stack = np.stack([self._slice(int(i)) for i in np.atleast_1d(picked)])
        return stack[(slice(None), *rest)]


def _read_pixels_error(e: Exception, where: str) -> ImageReadError:
    return ImageReadError(
        f"Could not read the pixel data of {where}: {type(e).__name__}: {e}. The file may be truncated, "
        "or compressed with a transfer syntax needing a decoder plugin (`pip install pylibjpeg "
        "pylibjpeg-libjpeg` or `pip install python-gdcm`)."
    )


# ---- readers ------------------------------------------------------------------------------------


def read_dicom(path: str | os.PathLike, *, series: str | int | None = None, lazy: bool = True) -> ImageVolume:
    """Read one DICOM series (folder, ``FOLDER::SERIES`` or a multi-frame file) as a volume.

    ``series``: the ``SeriesInstanceUID`` or the index in :func:`list_series` when the folder holds
    several (the ``::SERIES`` path suffix does the same). ``lazy=False`` reads every slice now.

    Raises :class:`ImageReadError` (nothing readable) or :class:`InvalidImageError` (several series
    without a choice, slices of different orientation or size, uneven gaps, missing geometry).
    """
    p, suffix = split_series(path)
    choice = series if series is not None else suffix
    info = _choose(list_series(p), choice, p)
    if len(info.files) == 1:
        import pydicom

        try:
            ds = pydicom.dcmread(info.files[0], stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001 - any pydicom failure is a read error of this file
            raise _read_pixels_error(e, info.files[0]) from e
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            return _read_multiframe(pathlib.Path(info.files[0]), info)
    return _read_single_frames(p, info, lazy)


def _meta(ds: Any, info: SeriesInfo, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "dicom": {
            "SeriesInstanceUID": info.uid,
            "StudyInstanceUID": str(getattr(ds, "StudyInstanceUID", "") or ""),
            "FrameOfReferenceUID": str(getattr(ds, "FrameOfReferenceUID", "") or ""),
            "Modality": info.modality,
            "SeriesDescription": info.description,
            "PatientID": str(getattr(ds, "PatientID", "") or ""),
            **extra,
        }
    }


def _read_single_frames(folder: pathlib.Path, info: SeriesInfo, lazy: bool) -> ImageVolume:
    headers = []
    for f in info.files:
        ds = _read_header(pathlib.Path(f))
        if ds is None:
            raise ImageReadError(f"Could not read {f} as DICOM any more (it changed while being read?).")
        headers.append(ds)
    where = f"{folder} (series {info.uid})"
    shapes = {(int(d.Rows), int(d.Columns)) for d in headers}
    if len(shapes) != 1:
        raise InvalidImageError(f"{where}: the slices have different sizes {sorted(shapes)}; it is not one volume.")
    planes = [
        _plane_from(getattr(d, "ImagePositionPatient", None), getattr(d, "ImageOrientationPatient", None),
                    getattr(d, "PixelSpacing", None), getattr(d, "SliceThickness", None), f"{where}, {f}")
        for d, f in zip(headers, info.files, strict=True)
    ]
    fallback = getattr(headers[0], "SpacingBetweenSlices", None)
    order, step, normal = _sorted_geometry(planes, where, float(fallback) if fallback else None)
    files = [info.files[i] for i in order]
    sorted_planes = [planes[i] for i in order]
    rescales = [_rescale(headers[i]) for i in order]
    bits = int(getattr(headers[0], "BitsAllocated", 16) or 16)
    signed = int(getattr(headers[0], "PixelRepresentation", 0) or 0) == 1
    stored = np.dtype(f"{'i' if signed else 'u'}{max(1, bits // 8)}")
    if int(getattr(headers[0], "SamplesPerPixel", 1) or 1) != 1:
        raise InvalidImageError(f"{where} is a colour DICOM series; only greyscale volumes are read.")
    rows, cols = shapes.pop()
    shape = (len(files), rows, cols)
    stack = _SeriesStack(files, rescales, shape, _out_dtype(stored, rescales))
    data: Any = LazyArray(stack, source=str(folder), format="dicom")
    if not lazy:
        data = np.asarray(data[...])
    affine = _affine(sorted_planes, step, normal)
    p0 = sorted_planes[0]
    spacing = (step, float(p0.pixel_spacing[0]), float(p0.pixel_spacing[1]))
    meta = _meta(headers[order[0]], info, {"SliceThickness": p0.thickness})
    meta["dicom_files"] = files
    return ImageVolume(data=data, spacing=spacing, origin=tuple(float(v) for v in affine[:3, 3]), affine=affine,
                       rgb=False, source=str(folder), format="dicom", meta=meta)


def _read_multiframe(path: pathlib.Path, info: SeriesInfo) -> ImageVolume:
    import pydicom

    where = str(path)
    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
    except Exception as e:  # noqa: BLE001 - any pydicom failure is a read error of this file
        raise _read_pixels_error(e, where) from e
    n = int(ds.NumberOfFrames)
    if pixels.ndim != 3 or pixels.shape[0] != n:
        raise InvalidImageError(f"{where}: a multi-frame image of shape {pixels.shape} is not a greyscale volume.")
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame = ds.PerFrameFunctionalGroupsSequence if "PerFrameFunctionalGroupsSequence" in ds else None
    if per_frame is None or len(per_frame) != n:
        raise InvalidImageError(
            f"{where}: a multi-frame file without per-frame positions (PerFrameFunctionalGroupsSequence) "
            "cannot be placed in space; convert it with `dcm2niix`."
        )

    def item(frame: Any, seq: str, default: Any = None) -> Any:
        for group in (frame, shared):
            if group is not None and seq in group and len(group[seq].value):
                return group[seq].value[0]
        return default

    planes, rescales = [], []
    for i, frame in enumerate(per_frame):
        pos, ori, meas = item(frame, "PlanePositionSequence"), item(frame, "PlaneOrientationSequence"), \
            item(frame, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None:
            raise InvalidImageError(f"{where}: frame {i} lacks its plane position, orientation or pixel measures.")
        planes.append(_plane_from(pos.ImagePositionPatient, ori.ImageOrientationPatient, meas.PixelSpacing,
                                  getattr(meas, "SliceThickness", None), f"{where}, frame {i}"))
        pvt = item(frame, "PixelValueTransformationSequence")
        rescales.append(_rescale(pvt) if pvt is not None else _rescale(ds))
    fallback = getattr(item(per_frame[0], "PixelMeasuresSequence"), "SpacingBetweenSlices", None)
    order, step, normal = _sorted_geometry(planes, where, float(fallback) if fallback else None)
    dtype = _out_dtype(pixels.dtype, rescales)
    data = np.empty(pixels.shape, dtype=dtype)
    for out_i, src_i in enumerate(order):
        slope, inter = rescales[src_i]
        frame_pixels = pixels[src_i]
        if slope != 1.0 or inter != 0.0:
            frame_pixels = frame_pixels.astype(np.float64) * slope + inter
        data[out_i] = frame_pixels
    sorted_planes = [planes[i] for i in order]
    affine = _affine(sorted_planes, step, normal)
    p0 = sorted_planes[0]
    spacing = (step, float(p0.pixel_spacing[0]), float(p0.pixel_spacing[1]))
    meta = _meta(ds, info, {"SliceThickness": p0.thickness, "multiframe": True})
    meta["dicom_files"] = [str(path)]
    return ImageVolume(data=data, spacing=spacing, origin=tuple(float(v) for v in affine[:3, 3]), affine=affine,
                       rgb=False, source=str(path), format="dicom", meta=meta)
