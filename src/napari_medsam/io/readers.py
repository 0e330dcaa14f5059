"""Read NIfTI, TIFF, ``.npy`` and zarr / OME-Zarr images into :class:`ImageVolume`.

The format follows the extension (case-insensitive; ``.nii.gz`` is one extension, ``.ome.zarr``
is zarr). Arrays keep the file's axis order; nothing is reoriented or resampled. With
``lazy=True`` (the default) pixel data stay on disk until indexed: NIfTI through nibabel's
``ArrayProxy`` (memory-mapped when uncompressed), TIFF and ``.npy`` through memory maps, zarr
through ``zarr.Array``.

nibabel, tifffile and zarr are imported when a file of their format is read, not on import.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_medsam.core.errors import ImageReadError, InvalidImageError, MedSamError
from napari_medsam.io.volume import ImageVolume, LazyArray

__all__ = ["SUPPORTED_EXTENSIONS", "image_format", "read_image"]

SUPPORTED_EXTENSIONS: tuple[str, ...] = (
    ".nii", ".nii.gz", ".tif", ".tiff", ".npy", ".zarr",
    ".mgh", ".mgz", ".mnc", ".hdr", ".img", ".par", ".rec", ".v", ".nrrd", ".nhdr", ".mha", ".mhd",
)
#: Formats :func:`~napari_medsam.io.write_labels` writes; the others are read only (write .nii.gz).
WRITABLE_FORMATS: tuple[str, ...] = ("nifti", "tiff", "npy", "zarr")

# extension -> format family; longest first so ".nii.gz" wins over ".gz" and ".ome.zarr" over ".zarr"
_EXTENSIONS: tuple[tuple[str, str], ...] = (
    (".ome.zarr", "zarr"),
    (".nii.gz", "nifti"),
    (".tiff", "tiff"),
    (".zarr", "zarr"),
    (".nrrd", "nrrd"),
    (".nhdr", "nrrd"),
    (".nii", "nifti"),
    (".tif", "tiff"),
    (".npy", "npy"),
    (".mgh", "nibabel"),  # FreeSurfer MGH / MGZ
    (".mgz", "nibabel"),
    (".mnc", "nibabel"),  # MINC 1 and 2
    (".hdr", "nibabel"),  # Analyze 7.5 / NIfTI pairs
    (".img", "nibabel"),
    (".par", "nibabel"),  # Philips PAR / REC
    (".rec", "nibabel"),
    (".mha", "metaimage"),
    (".mhd", "metaimage"),
    (".v", "ecat"),  # ECAT 7
)

_FORMAT_NAMES = {"nifti": "NIfTI", "tiff": "TIFF", "npy": "NumPy .npy", "zarr": "zarr", "nrrd": "NRRD",
                 "nibabel": "a nibabel format (MGH/MGZ, MINC, Analyze, PAR/REC)", "metaimage": "MetaImage",
                 "ecat": "ECAT"}

# Hints for formats people commonly try; the error message lists what is supported.
_CONVERT_HINTS = {
    ".dcm": "For a DICOM series convert the folder to NIfTI first, e.g. `dcm2niix -z y -o OUT DICOM_DIR`.",
    ".npz": "Save one array with `numpy.save('x.npy', array)` instead of an .npz archive.",
    ".gz": "Only gzip-compressed NIfTI (.nii.gz) is supported among .gz files.",
}


def split_extension(path: str | os.PathLike) -> tuple[str, str]:
    """``(stem, extension)`` of a file name, the extension lower-case and multi-part aware.

    ``"CT.NII.GZ" -> ("CT", ".nii.gz")``; an unknown extension comes back as the last suffix.
    """
    name = pathlib.Path(path).name
    lower = name.lower()
    for ext, _ in _EXTENSIONS:
        if lower.endswith(ext) and len(lower) > len(ext):
            return name[: -len(ext)], ext
    suffix = pathlib.PurePath(lower).suffix
    return (name[: -len(suffix)] if suffix else name), suffix


def image_format(path: str | os.PathLike) -> str | None:
    """Format family of ``path`` from its extension: ``"nifti"``, ``"tiff"``, ``"npy"``, ``"zarr"``.

    A path inside a zarr store (``scan.zarr/0``) is ``"zarr"``. ``None`` when unsupported.
    """
    p = pathlib.Path(path)
    _, ext = split_extension(p)
    for known, fmt in _EXTENSIONS:
        if ext == known:
            return fmt
    if any(part.lower().endswith(".zarr") for part in p.parts[:-1]):
        return "zarr"
    return None


def _unsupported(path: pathlib.Path) -> ImageReadError:
    _, ext = split_extension(path)
    hint = _CONVERT_HINTS.get(ext, "")
    if not hint and path.is_dir():
        hint = _CONVERT_HINTS[".dcm"] if any(path.glob("*.dcm")) else ""
    return ImageReadError(
        f"Cannot read {path}: unsupported file type {ext or '(no extension)'!r}. "
        f"Supported extensions: {', '.join(SUPPORTED_EXTENSIONS)} (also .ome.zarr). {hint}".rstrip()
    )


def read_image(path: str | os.PathLike, *, lazy: bool = True) -> ImageVolume:
    """Read an image file into an :class:`ImageVolume`.

    Parameters
    ----------
    path
        A ``.nii``, ``.nii.gz``, ``.tif``, ``.tiff``, ``.npy`` file or a ``.zarr`` / ``.ome.zarr``
        store (a plain array or an OME-NGFF 0.4 / 0.5 image group).
    lazy
        Keep pixel data on disk and read them when indexed (default); ``False`` loads everything.

    Raises
    ------
    ImageReadError
        The file is missing, of an unsupported type, or corrupt.
    InvalidImageError
        The file holds no usable 2D / 3D image (empty, 1D, 4D series, multi-channel).
    """
    path = pathlib.Path(os.fspath(path)).expanduser()
    if image_format(path) is None:  # a DICOM series folder, FOLDER::SERIES or a .dcm file
        from napari_medsam.io import dicom

        if dicom.is_dicom_path(path):
            return dicom.read_dicom(path, lazy=lazy)
    if not path.exists():
        raise ImageReadError(f"Image file not found: {path}")
    fmt = image_format(path)
    if fmt is None:
        raise _unsupported(path)
    reader = {"nifti": _read_nifti, "tiff": _read_tiff, "npy": _read_npy, "zarr": _read_zarr,
              "nibabel": _read_nibabel, "ecat": _read_nibabel, "nrrd": _read_nrrd,
              "metaimage": _read_metaimage}[fmt]
    try:
        return reader(path, lazy)
    except MedSamError:
        raise
    except Exception as e:
        raise ImageReadError(
            f"Could not read {path} as {_FORMAT_NAMES[fmt]}: {type(e).__name__}: {e}. "
            "The file may be truncated, corrupt or not really of this format; re-export or re-download it."
        ) from e


# ---- NIfTI ------------------------------------------------------------------------------------


def _read_nifti(path: pathlib.Path, lazy: bool) -> ImageVolume:
    import nibabel as nib

    img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InvalidImageError(
            f"{path} is a {type(img).__name__}, not a NIfTI volume (CIFTI and surface files hold no "
            "voxel grid). Use the NIfTI volume it was made from."
        )
    header = img.header
    shape = tuple(int(s) for s in img.shape)
    # Hide trailing length-1 axes beyond the third (a (X, Y, Z, 1) "4D" file is a volume).
    drop, kept = _kept_axes(path, shape, "NIfTI", how="with nibabel `nib.save(img.slicer[..., 0], 'vol0.nii.gz')` "
                            "or FSL `fslroi in.nii.gz vol0.nii.gz 0 1`")
    proxy = img.dataobj
    _check_nifti_size(path, img, shape)
    dtype = _nifti_dtype(proxy, shape)
    # gzip cannot seek: every lazy slice read of a .nii.gz would decompress the file again,
    # so compressed NIfTI is decompressed once into memory; uncompressed .nii stays memory-mapped.
    in_memory = not lazy or path.name.lower().endswith(".gz")
    check_declared_size(path, shape, img.get_data_dtype(), in_memory=in_memory,
                        compressed=path.name.lower().endswith(".gz"), out_dtype=dtype)
    if not in_memory:
        data: Any = LazyArray(proxy, dtype=dtype, drop_axes=drop, source=str(path), format="nifti")
    else:
        full = np.asanyarray(proxy)
        data = np.asarray(full.reshape(kept), dtype=dtype)
    ndim = len(kept)
    zooms = [abs(float(z)) for z in header.get_zooms()[:ndim]]
    spacing = tuple(z if z > 0 and np.isfinite(z) else 1.0 for z in zooms)
    affine = np.array(img.affine, dtype=float)
    origin = tuple(float(v) for v in affine[:ndim, 3])
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    meta = {
        "nifti_header": header.copy(),
        "nifti_version": 2 if isinstance(img, nib.Nifti2Image) else 1,
        "qform": None if qform is None else np.array(qform),
        "sform": None if sform is None else np.array(sform),
        "qform_code": int(qcode),
        "sform_code": int(scode),
        "on_disk_dtype": np.dtype(img.get_data_dtype()).str,
    }
    return ImageVolume(
        data=data,
        spacing=spacing,
        origin=origin,
        affine=affine,
        rgb=False,
        source=str(path),
        format="nifti",
        meta=meta,
    )


#: The most a deflate (gzip) stream can expand: 1032 : 1 (zlib's technical details), plus headers.
_DEFLATE_MAX_RATIO = 1032


def _available_memory() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with napari
        return None
    return int(psutil.virtual_memory().available)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_declared_size(
    path: pathlib.Path,
    shape: tuple[int, ...],
    dtype: Any,
    *,
    in_memory: bool,
    compressed: bool = False,
    out_dtype: Any = None,
    available: int | None = None,
) -> None:
    """Refuse, before any allocation, a header whose declared size cannot be read.

    ``in_memory``: the whole array will be loaded (compressed files, ``lazy=False``), so it must fit
    in the free memory; else only 2D slices are read, and the largest one (as float32, what the
    intensity mapping makes of it) must fit in half of it. ``compressed``: the file is a gzip / deflate
    stream, which cannot expand more than 1032 times, so a small file that declares a huge array is
    truncated or lies. ``available`` overrides the free memory (tests).
    """
    n = int(np.prod([int(s) for s in shape], dtype=np.float64))
    nbytes = n * max(np.dtype(dtype).itemsize, np.dtype(out_dtype or dtype).itemsize)
    if compressed:
        size = path.stat().st_size
        if nbytes > size * _DEFLATE_MAX_RATIO + 2**16:
            raise ImageReadError(
                f"Could not read {path}: its header declares shape {tuple(shape)} ({_gib(nbytes)}) but a "
                f"compressed file of {size} bytes holds at most {_gib(size * _DEFLATE_MAX_RATIO)}; the file is "
                "truncated or its header is wrong. Re-export or re-download it.")
    free = _available_memory() if available is None else available
    if free is None:
        return
    if in_memory and nbytes > free:
        raise ImageReadError(
            f"{path} declares shape {tuple(shape)}: {_gib(nbytes)} to load, more than the {_gib(free)} of free "
            "memory. Crop or downsample it first, or save it uncompressed (.nii, zarr) so it is read slice by slice.")
    spatial = [int(s) for s in shape[:3]]
    if len(spatial) == 3:
        biggest = max(spatial[0] * spatial[1], spatial[0] * spatial[2], spatial[1] * spatial[2]) * 4
        if biggest > free // 2:
            raise ImageReadError(
                f"{path} declares shape {tuple(shape)}: one slice of it is {_gib(biggest)} as float32, more than "
                f"half the {_gib(free)} of free memory. Crop or downsample it first.")


def _check_nifti_size(path: pathlib.Path, img: Any, shape: tuple[int, ...]) -> None:
    """Catch a truncated uncompressed NIfTI at open time (compressed ones fail when read)."""
    if path.name.lower().endswith(".gz"):
        return
    offset = int(img.dataobj.offset)
    needed = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(img.get_data_dtype()).itemsize
    size = path.stat().st_size
    if size < needed:
        raise ImageReadError(
            f"Could not read {path} as NIfTI: the file is truncated ({size} bytes, the header needs "
            f"{needed} for shape {shape}). Re-export or re-download it."
        )


def _nifti_dtype(proxy: Any, shape: tuple[int, ...]) -> np.dtype:
    """The dtype indexing the proxy returns: on-disk, or float when scl_slope / scl_inter apply."""
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    if slope == 1.0 and inter == 0.0:
        return np.dtype(proxy.dtype).newbyteorder("=")
    corner = np.asanyarray(proxy[tuple(slice(0, 1) for _ in shape)])
    return np.dtype(corner.dtype).newbyteorder("=")


# ---- other volumetric formats: nibabel (MGH/MGZ, MINC 1/2, Analyze, PAR/REC, ECAT), NRRD, MetaImage ----


def _kept_axes(path: pathlib.Path, shape: tuple[int, ...], what: str, *,
               how: str = "with nibabel `nib.save(nib.Nifti1Image(img.dataobj[..., 0], img.affine), 'vol0.nii.gz')`",
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Trailing length-1 axes beyond the third to hide, and the shape kept; refuses real 4D+ data
    (``how``: the advice on saving one volume of it)."""
    drop = tuple(i for i in range(3, len(shape)) if shape[i] == 1)
    kept = tuple(s for i, s in enumerate(shape) if i not in drop)
    if len(kept) > 3:
        raise InvalidImageError(
            f"{path} is a {len(kept)}D {what} of shape {shape} (a time series, echoes or several channels); "
            f"only 2D and 3D images can be segmented. Save one volume of it first, e.g. {how}."
        )
    if len(kept) < 2 or min(kept) < 1:
        raise InvalidImageError(f"{path} holds no 2D or 3D image (shape {shape}).")
    return drop, kept


def _geometry_from_affine(affine: np.ndarray, ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Voxel spacing (column norms) and origin of a 4x4 voxel-to-world affine, for ``ndim`` axes."""
    cols = np.linalg.norm(affine[:3, :ndim], axis=0)
    spacing = tuple(float(z) if z > 0 and np.isfinite(z) else 1.0 for z in cols)
    return spacing, tuple(float(v) for v in affine[:ndim, 3])


def _read_nibabel(path: pathlib.Path, lazy: bool) -> ImageVolume:
    """Any volume nibabel reads besides NIfTI, with its affine (nibabel's RAS+ world)."""
    import nibabel as nib

    if image_format(path) == "ecat":
        import nibabel.ecat

        img: Any = nibabel.ecat.load(path)
    else:
        img = nib.load(path)
    if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):  # a .hdr/.img NIfTI pair is NIfTI
        return _read_nifti(path, lazy)
    kind = type(img).__name__.replace("Image", "")
    shape = tuple(int(s) for s in img.shape)
    drop, kept = _kept_axes(path, shape, kind)
    proxy = img.dataobj
    corner = np.asanyarray(proxy[tuple(slice(0, 1) for _ in shape)])
    dtype = np.dtype(corner.dtype).newbyteorder("=")
    compressed = path.name.lower().endswith((".mgz", ".gz"))
    in_memory = not lazy or compressed or not nib.is_proxy(proxy)
    check_declared_size(path, shape, dtype, in_memory=in_memory, compressed=compressed)
    if in_memory:
        data: Any = np.asarray(np.asanyarray(proxy).reshape(kept), dtype=dtype)
    else:
        data = LazyArray(proxy, dtype=dtype, drop_axes=drop, source=str(path), format="nibabel")
    affine = np.array(img.affine, dtype=float)
    spacing, origin = _geometry_from_affine(affine, len(kept))
    return ImageVolume(data=data, spacing=spacing, origin=origin, affine=affine, rgb=False, source=str(path),
                       format="nibabel", meta={"nibabel_class": type(img).__name__})


def _lps_to_ras(affine: np.ndarray) -> np.ndarray:
    out = np.array(affine, dtype=float)
    out[:2, :] *= -1
    return out


def _read_nrrd(path: pathlib.Path, lazy: bool) -> ImageVolume:
    """NRRD (``.nrrd`` / detached ``.nhdr``) through pynrrd, in its (i, j, k) index order, with the
    affine from ``space directions`` / ``space origin`` in RAS+ (as nibabel's)."""
    import nrrd

    header = nrrd.read_header(str(path))
    sizes = tuple(int(v) for v in header.get("sizes", ()))
    try:
        dtype = np.dtype(nrrd.reader._determine_datatype(header))
    except Exception:  # noqa: BLE001 - pynrrd's own type table; the read below names a bad type
        dtype = np.dtype(np.float64)  # the largest, for the size check
    drop, kept = _kept_axes(path, sizes, "NRRD")
    raw = str(header.get("encoding", "raw")).lower() in ("raw",)
    check_declared_size(path, sizes, dtype, in_memory=True, compressed=not raw and "data file" not in header)
    data, header = nrrd.read(str(path), index_order="F")
    data = np.asarray(data).reshape(kept)
    ndim = len(kept)
    affine = None
    directions = header.get("space directions")
    if directions is not None:
        rows = [r for r in np.asarray(directions, dtype=object) if r is not None and not
                (isinstance(r, float) and np.isnan(r))]
        dirs = np.array([np.asarray(r, dtype=float) for r in rows], dtype=float)
        if dirs.shape[0] != ndim:
            raise InvalidImageError(
                f"{path}: NRRD with {ndim} axes but {dirs.shape[0]} spatial directions (a channel or list "
                "axis?); only single-channel 2D / 3D images can be segmented. Save one channel first.")
        dim = dirs.shape[1]
        affine = np.eye(4)
        affine[:dim, :ndim] = dirs.T
        origin = np.asarray(header.get("space origin", np.zeros(dim)), dtype=float)
        affine[:dim, 3] = origin
        space = str(header.get("space", "")).lower()
        if space in ("left-posterior-superior", "lps"):
            affine = _lps_to_ras(affine)
    if affine is not None and np.isfinite(affine).all():
        spacing, origin_t = _geometry_from_affine(affine, ndim)
    else:
        affine = None
        spacing = tuple(float(v) for v in header.get("spacings", [1.0] * ndim))
        origin_t = (0.0,) * ndim
    return ImageVolume(data=data, spacing=spacing, origin=origin_t, affine=affine, rgb=False, source=str(path),
                       format="nrrd", meta={"nrrd_header": dict(header)})


def _read_metaimage(path: pathlib.Path, lazy: bool) -> ImageVolume:
    """MetaImage (``.mha`` / ``.mhd`` + raw) through SimpleITK, in (i, j, k) order like NIfTI, with the
    affine from ITK's direction, spacing and origin in RAS+ (ITK's world is LPS)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = tuple(int(v) for v in reader.GetSize())  # ITK order: (i, j, k)
    comps = int(reader.GetNumberOfComponents())
    if comps != 1:
        raise InvalidImageError(
            f"{path} has {comps} components per voxel (vector or colour data); only single-channel 2D / 3D "
            "images can be segmented. Save one component first.")
    drop, kept = _kept_axes(path, size, "MetaImage")
    dtype = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * len(size), reader.GetPixelID())).dtype)
    # a .mha holds its (maybe zlib-compressed) data after the text header; a .mhd points to another file
    head = ""
    if path.suffix.lower() == ".mha":
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("latin-1")
    compressed = bool(re.search(r"^\s*CompressedData\s*=\s*True", head, re.MULTILINE | re.IGNORECASE))
    check_declared_size(path, size, dtype, in_memory=True, compressed=compressed)
    img = reader.Execute()
    data = sitk.GetArrayFromImage(img).T.reshape(kept)  # numpy (k, j, i) -> (i, j, k)
    n = len(size)
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(n, n)
    spacing_itk = np.asarray(img.GetSpacing(), dtype=float)
    affine = np.eye(4)
    affine[:n, :n] = direction * spacing_itk[None, :]
    affine[:n, 3] = np.asarray(img.GetOrigin(), dtype=float)
    affine = _lps_to_ras(affine) if n >= 2 else affine
    ndim = len(kept)
    spacing, origin = _geometry_from_affine(affine, ndim)
    return ImageVolume(data=np.ascontiguousarray(data) if not lazy else data, spacing=spacing, origin=origin,
                       affine=affine, rgb=False, source=str(path), format="metaimage", meta={})


# ---- TIFF -------------------------------------------------------------------------------------


def _read_tiff(path: pathlib.Path, lazy: bool) -> ImageVolume:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ImageReadError(
                f"Could not read {path} as TIFF: it holds no image. The file may be truncated or "
                "corrupt; re-export it."
            )
        series = tif.series[0]
        axes = str(series.axes).upper()
        shape = tuple(int(s) for s in series.shape)
        page = series.pages[0] if series.pages else tif.pages[0]
        photometric = int(getattr(page, "photometric", -1))
        resolution = getattr(page, "resolution", (1.0, 1.0))
        ij = tif.imagej_metadata or {}
        ours = _our_tiff_metadata(ij, tif.shaped_metadata)
        data: Any = None
        if lazy:
            try:
                data = tifffile.memmap(path, mode="r")
            except (ValueError, OSError):  # compressed, tiled or otherwise not contiguous
                data = None
            if data is not None and tuple(data.shape) != shape:
                data = None
        if data is None:
            data = series.asarray()
    dtype = np.dtype(data.dtype)
    rgb = (
        (axes.endswith("S") and shape[-1] in (3, 4))
        or (photometric == 2 and len(shape) >= 3 and shape[-1] in (3, 4))
        or (len(shape) in (3, 4) and shape[-1] in (3, 4) and dtype == np.uint8)
    )
    spatial_axes = axes[:-1] if rgb else axes
    for letter, name in (("C", "channels"), ("T", "time points")):
        if letter in spatial_axes and shape[spatial_axes.index(letter)] > 1:
            raise InvalidImageError(
                f"{path} has {shape[spatial_axes.index(letter)]} {name} (axes {axes}, shape {shape}); "
                "only a single 2D / 3D image can be segmented. Save one channel / time point, e.g. "
                "`tifffile.imwrite('one.tif', tifffile.imread(path)[:, 0], imagej=True, "
                "metadata={'axes': 'ZYX'})` for axes ZCYX; if they are really the slices of one volume, "
                "re-save them with axes 'ZYX'."
            )
    n = len(spatial_axes)
    spacing: list[float] = [1.0] * n
    origin: list[float] = [0.0] * n
    if n in (2, 3):
        x_res, y_res = (float(r) for r in resolution)
        spacing[-1] = 1.0 / x_res if x_res > 0 else 1.0
        spacing[-2] = 1.0 / y_res if y_res > 0 else 1.0
        if n == 3:
            z = _float_or(ij.get("spacing"), 1.0)
            spacing[0] = z if z > 0 else 1.0
        if ours:
            spacing = _floats_or(ours.get("spacing"), n, spacing)
            origin = _floats_or(ours.get("origin"), n, origin)
    meta: dict[str, Any] = {"axes": axes, "photometric": photometric}
    if ij:
        meta["imagej"] = dict(ij)
    return _volume_with_ours(data, spacing, origin, rgb=rgb, path=path, fmt="tiff", meta=meta, ours=ours)


def _volume_with_ours(data: Any, spacing: Sequence[float], origin: Sequence[float], *, rgb: bool,
                      path: pathlib.Path, fmt: str, meta: dict, ours: dict) -> ImageVolume:
    """The volume of a TIFF or zarr file: the affine our writers stored in ``ours`` (their
    ``napari_medsam`` metadata) is its affine, and ``ours`` is kept as ``meta["napari_medsam"]``."""
    if ours:
        meta = {**meta, "napari_medsam": ours}
    return ImageVolume(data=data, spacing=tuple(spacing), origin=tuple(origin), affine=ours.get("affine"),
                       rgb=rgb, source=str(path), format=fmt, meta=meta)


def _our_tiff_metadata(imagej: dict, shaped: Any) -> dict:
    """The geometry our writer stored as a JSON string under ``napari_medsam`` (ImageJ or shaped)."""
    candidates = [imagej.get("napari_medsam")]
    candidates += [m.get("napari_medsam") for m in (shaped or ()) if isinstance(m, dict)]
    for value in candidates:
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                return parsed
    return {}


def _float_or(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _floats_or(values: Any, n: int, default: list[float]) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        return default
    out = [_float_or(v, float("nan")) for v in values]
    return default if any(np.isnan(out)) else out


# ---- .npy -------------------------------------------------------------------------------------


def _read_npy(path: pathlib.Path, lazy: bool) -> ImageVolume:
    data = np.load(path, mmap_mode="r" if lazy else None, allow_pickle=False)
    vol = ImageVolume.from_array(data)
    return ImageVolume(
        data=vol.data,
        spacing=vol.spacing,
        origin=vol.origin,
        affine=None,
        rgb=vol.rgb,
        source=str(path),
        format="npy",
    )


# ---- zarr / OME-Zarr --------------------------------------------------------------------------


def _read_zarr(path: pathlib.Path, lazy: bool) -> ImageVolume:
    import zarr

    node = zarr.open(str(path), mode="r")
    attrs = node.attrs.asdict()
    ours = attrs.get("napari_medsam") if isinstance(attrs.get("napari_medsam"), dict) else {}
    if isinstance(node, zarr.Array):
        return _zarr_volume(path, node, lazy, fmt="zarr", ours=ours)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else {}
    multiscales = ome.get("multiscales") or attrs.get("multiscales")
    if not multiscales:
        arrays = sorted(node.array_keys())
        if len(arrays) == 1:
            return _zarr_volume(path, node[arrays[0]], lazy, fmt="zarr", ours=ours)
        if not arrays:
            raise InvalidImageError(f"{path} is a zarr group that holds no array.")
        raise InvalidImageError(
            f"{path} is a zarr group without OME-NGFF `multiscales` metadata and with "
            f"{len(arrays)} arrays ({', '.join(arrays)}); open one of them, e.g. `{path / arrays[0]}`."
        )
    ms = multiscales[0]
    dataset = ms["datasets"][0]
    array = node[str(dataset["path"])]
    ndim = array.ndim
    axes = _ngff_axes(ms.get("axes"), ndim)
    scale = np.ones(ndim)
    translation = np.zeros(ndim)
    # dataset transforms first, then the multiscale-level ones (NGFF 0.4 / 0.5)
    for transforms in (dataset.get("coordinateTransformations"), ms.get("coordinateTransformations")):
        s, t = _ngff_scale_translation(transforms, ndim)
        scale, translation = scale * s, translation * s + t
    version = str(ome.get("version") or ms.get("version") or "")
    return _zarr_volume(
        path,
        array,
        lazy,
        fmt="ome-zarr",
        ours=ours,
        axes=axes,
        scale=scale,
        translation=translation,
        meta={"ngff_version": version, "multiscales": ms, "image-label": attrs.get("image-label")},
    )


def _ngff_axes(axes: Any, ndim: int) -> list[tuple[str, str]]:
    """``[(name, type)]`` per array axis; NGFF 0.3 lists names only, older files none."""
    if not isinstance(axes, list) or len(axes) != ndim:
        return [("", "space")] * ndim
    out = []
    for ax in axes:
        if isinstance(ax, dict):
            name = str(ax.get("name", ""))
            kind = str(ax.get("type") or {"t": "time", "c": "channel"}.get(name.lower(), "space"))
        else:
            name = str(ax)
            kind = {"t": "time", "c": "channel"}.get(name.lower(), "space")
        out.append((name, kind))
    return out


def _ngff_scale_translation(transforms: Any, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.ones(ndim)
    translation = np.zeros(ndim)
    for tr in transforms or ():
        if not isinstance(tr, dict):
            continue
        if tr.get("type") == "scale" and len(tr.get("scale") or ()) == ndim:
            scale = scale * np.asarray(tr["scale"], dtype=float)
        elif tr.get("type") == "translation" and len(tr.get("translation") or ()) == ndim:
            translation = translation + np.asarray(tr["translation"], dtype=float)
    return scale, translation


def _warn_missing_chunks(path: pathlib.Path, array: Any) -> None:
    """Log how many chunks a zarr image does not store (they read as its fill value)."""
    import logging

    try:
        stored, total = int(array.nchunks_initialized), int(array.nchunks)
    except Exception:  # noqa: BLE001 - a store that cannot list its keys: nothing to tell
        return
    if stored < total:
        logging.getLogger(__name__).warning(
            "%s: %d of %d chunks are not stored and read as the fill value %s (zarr does not store chunks "
            "that hold only that value; if chunks were lost, re-export the image)", path, total - stored, total,
            getattr(array, "fill_value", 0))


def _zarr_volume(
    path: pathlib.Path,
    array: Any,
    lazy: bool,
    *,
    fmt: str,
    ours: dict,
    axes: list[tuple[str, str]] | None = None,
    scale: np.ndarray | None = None,
    translation: np.ndarray | None = None,
    meta: dict | None = None,
) -> ImageVolume:
    shape = tuple(int(s) for s in array.shape)
    ndim = len(shape)
    axes = axes or [("", "space")] * ndim
    drop = []
    for i, (name, kind) in enumerate(axes):
        if kind == "space":
            continue
        if shape[i] == 1:
            drop.append(i)
            continue
        raise InvalidImageError(
            f"{path} has a {kind} axis {name!r} of length {shape[i]} (shape {shape}); only a single "
            "2D / 3D image can be segmented. Save one channel / time point as its own image."
        )
    keep = [i for i in range(ndim) if i not in drop]
    kept_shape = tuple(shape[i] for i in keep)
    check_declared_size(path, kept_shape, array.dtype, in_memory=not lazy)
    labels = bool((meta or {}).get("image-label")) or ours.get("kind") == "labels"
    if not labels:
        _warn_missing_chunks(path, array)
    # Always through LazyArray: a corrupt chunk, found only when read, is an ImageReadError naming the file.
    data: Any = LazyArray(array, drop_axes=tuple(drop), source=str(path), format=fmt)
    if not lazy:
        data = np.asarray(data[...])
    rgb = fmt == "zarr" and len(kept_shape) in (3, 4) and kept_shape[-1] in (3, 4) and array.dtype == np.uint8
    n = len(keep) - (1 if rgb else 0)
    spacing = [1.0] * n if scale is None else [float(scale[i]) for i in keep][:n]
    origin = [0.0] * n if translation is None else [float(translation[i]) for i in keep][:n]
    return _volume_with_ours(data, spacing, origin, rgb=rgb, path=path, fmt=fmt, meta=dict(meta or {}), ours=ours)
