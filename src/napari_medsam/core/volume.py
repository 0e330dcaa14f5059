"""The image value object every reader returns and every writer takes as a reference.

An :class:`ImageVolume` is an array-like plus its geometry. Arrays stay in the order the file gives
them (NIfTI ``(i, j, k)``, TIFF / zarr / npy ``(z, y, x)`` or ``(y, x)``): nothing is reoriented, so
napari shows the array with ``scale=spacing`` and ``translate=origin`` and a label array drawn on it
can be written back with the reference's exact geometry.

The data may be lazy (a memory map, a ``zarr.Array``, a NIfTI proxy wrapped in :class:`LazyArray`);
indexing it reads only what the index asks for and returns a ``numpy.ndarray``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ImageReadError, InvalidImageError

__all__ = ["ImageVolume", "LazyArray"]

# Errors raised while lazily reading a damaged file, turned into ImageReadError on access.
# codecs raise RuntimeError; nibabel a ValueError ("Whoops, not enough data in file") on a truncated file
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, RuntimeError, ValueError)
_FORMAT_NAMES = {
    "nifti": "NIfTI",
    "tiff": "TIFF",
    "npy": "NumPy .npy",
    "zarr": "zarr",
    "ome-zarr": "OME-Zarr",
}


class LazyArray:
    """A read-only array-like over a lazily indexed ``base`` (e.g. a nibabel ``ArrayProxy``).

    ``drop_axes`` are length-1 axes of ``base`` hidden from the outside (a NIfTI ``(X, Y, Z, 1)``
    reads as ``(X, Y, Z)``); indexing reads only the requested part of the file and returns a
    ``numpy.ndarray`` of :attr:`dtype`. Read errors name the file and format.
    """

    def __init__(
        self,
        base: Any,
        *,
        dtype: np.dtype | None = None,
        drop_axes: tuple[int, ...] = (),
        source: str | None = None,
        format: str = "",  # noqa: A002 - mirrors ImageVolume.format
        convert: Callable[[Any], np.ndarray] = np.asanyarray,
    ) -> None:
        base_shape = tuple(int(s) for s in base.shape)
        ndim = len(base_shape)
        drop = tuple(sorted({a % ndim for a in drop_axes})) if ndim else ()
        for a in drop:
            if base_shape[a] != 1:
                raise InvalidImageError(f"Cannot hide axis {a} of length {base_shape[a]} (only length 1).")
        self._base = base
        self._drop = drop
        self._convert = convert
        self._source = source
        self._format = format
        self.shape: tuple[int, ...] = tuple(s for i, s in enumerate(base_shape) if i not in drop)
        self.dtype = np.dtype(dtype if dtype is not None else base.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype}, format={self._format!r}, source={self._source!r})"

    def _base_index(self, key: Any) -> tuple:
        """Turn an index into this array into one into ``base`` (a full-length tuple)."""
        key = key if isinstance(key, tuple) else (key,)
        n_ellipsis = sum(k is Ellipsis for k in key)
        if n_ellipsis > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        n_real = sum(k is not None and k is not Ellipsis for k in key)
        if n_real > self.ndim:
            raise IndexError(
                f"too many indices for array: array is {self.ndim}-dimensional, but {n_real} were indexed"
            )
        fill = (slice(None),) * (self.ndim - n_real)
        if n_ellipsis:
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + fill + key[at + 1 :]
        else:
            key = key + fill
        if not self._drop:
            return key
        # Re-insert index 0 for each hidden axis, counting only entries that consume an axis.
        out: list[Any] = []
        axis = 0
        for k in key:
            while axis in self._drop:
                out.append(0)
                axis += 1
            out.append(k)
            if k is not None:
                axis += 1
        while axis in self._drop:
            out.append(0)
            axis += 1
        return tuple(out)

    def __getitem__(self, key: Any) -> np.ndarray:
        index = self._base_index(key)
        try:
            out = self._convert(self._base[index])
        except _READ_ERRORS as e:
            raise ImageReadError(
                f"Could not read {self._source or 'image'} as "
                f"{_FORMAT_NAMES.get(self._format, self._format or 'array')}: "
                f"{type(e).__name__}: {e}. The file may be truncated or corrupt; re-export it."
            ) from e
        return np.asarray(out, dtype=self.dtype)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)


def _as_float_tuple(values: Any, n: int, default: float, what: str) -> tuple[float, ...]:
    if values is None:
        return (float(default),) * n
    out = tuple(float(v) for v in np.ravel(np.asarray(values, dtype=float)))
    if len(out) != n:
        raise InvalidImageError(f"{what} has {len(out)} values but the image has {n} spatial axes: {out}.")
    if not all(np.isfinite(out)):
        raise InvalidImageError(f"{what} must be finite, got {out}.")
    return out


def _guess_rgb(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    return len(shape) in (3, 4) and shape[-1] in (3, 4) and np.dtype(dtype) == np.uint8


@dataclass(frozen=True, eq=False)
class ImageVolume:
    """An image array with its voxel geometry.

    ``data`` has ``.shape``, ``.dtype``, ``.ndim`` and ``__getitem__`` returning ``numpy.ndarray``;
    it is 2D ``(H, W)`` or 3D ``(D, H, W)`` (NIfTI: ``(i, j, k)``), plus a trailing colour axis of
    3 or 4 when ``rgb``. ``spacing`` and ``origin`` have one value per spatial array axis (the colour
    axis excluded) and map to napari's ``scale`` and ``translate``; ``affine`` is the 4x4
    voxel-to-world matrix of a NIfTI file, else ``None``.

    Construction validates: an empty array, 1D or >4D data and 4D data that is not RGB raise
    :class:`InvalidImageError`. Equality is identity (arrays do not compare as booleans).
    """

    data: Any
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    affine: np.ndarray | None
    rgb: bool = False
    source: str | None = None
    format: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        data = self.data
        if not all(hasattr(data, a) for a in ("shape", "dtype", "__getitem__")):
            raise InvalidImageError(
                f"Image data must be array-like (shape, dtype, indexing), got {type(data).__name__}."
            )
        shape = tuple(int(s) for s in data.shape)
        where = f" ({self.source})" if self.source else ""
        dtype = np.dtype(data.dtype)
        if dtype.kind not in "biuf":
            raise InvalidImageError(
                f"The image{where} has dtype {dtype}: only boolean, integer and float images can be "
                "segmented (complex, structured and RGB-record dtypes cannot)."
            )
        if any(s == 0 for s in shape):
            raise InvalidImageError(f"The image{where} is empty: shape {shape}.")
        if self.rgb and (len(shape) < 3 or shape[-1] not in (3, 4)):
            raise InvalidImageError(
                f"An RGB image needs a last axis of 3 or 4 colour channels; got shape {shape}{where}."
            )
        spatial = shape[:-1] if self.rgb else shape
        if len(spatial) < 2:
            raise InvalidImageError(
                f"The image{where} has shape {shape}: a 2D (H, W) or 3D (D, H, W) image is needed. "
                "Reshape a flat array to its image size first."
            )
        if len(spatial) > 3:
            raise InvalidImageError(
                f"The image{where} has shape {shape}: only 2D and 3D images (plus an RGB colour axis) "
                "can be segmented. For a 4D series (time points or channels) extract one 3D volume "
                "first, e.g. with nibabel `image.slicer[..., 0]`, `fslroi in out 0 1` or `array[..., 0]`."
            )
        n = len(spatial)
        spacing = _as_float_tuple(self.spacing, n, 1.0, "spacing")
        if any(s <= 0 for s in spacing):
            raise InvalidImageError(f"spacing must be positive, got {spacing}{where}.")
        origin = _as_float_tuple(self.origin, n, 0.0, "origin")
        affine = self.affine
        if affine is not None:
            affine = np.array(affine, dtype=float)
            if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
                raise InvalidImageError(
                    f"affine must be a finite 4x4 matrix, got shape {affine.shape}{where}."
                )
            affine.setflags(write=False)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "rgb", bool(self.rgb))

    # ---- shape helpers -------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        """Full array shape, colour axis included when ``rgb``."""
        return tuple(int(s) for s in self.data.shape)

    @property
    def ndim(self) -> int:
        """Number of array axes, colour axis included when ``rgb``."""
        return len(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the colour axis: the shape a label array for this image must have."""
        return self.shape[:-1] if self.rgb else self.shape

    @property
    def spatial_ndim(self) -> int:
        """2 or 3."""
        return len(self.spatial_shape)

    def _axis(self, axis: int) -> int:
        n = self.spatial_ndim
        if not -n <= axis < n:
            raise IndexError(f"axis {axis} is out of range for a {n}D image of shape {self.spatial_shape}.")
        return axis % n

    def n_slices(self, axis: int) -> int:
        """Number of 2D slices along spatial ``axis``; a 2D image is one slice along any axis."""
        axis = self._axis(axis)
        return 1 if self.spatial_ndim == 2 else self.spatial_shape[axis]

    def slice_shape(self, axis: int) -> tuple[int, int]:
        """``(H, W)`` of a slice along spatial ``axis`` (a 2D image: its own shape, whatever the axis)."""
        shape = tuple(int(s) for s in self.spatial_shape)
        if self.spatial_ndim == 2:
            return shape  # type: ignore[return-value]
        axis = self._axis(axis)
        return tuple(s for i, s in enumerate(shape) if i != axis)  # type: ignore[return-value]

    def slice(self, axis: int, index: int) -> np.ndarray:
        """Slice ``index`` along spatial ``axis`` as a ``numpy.ndarray``, reading only that slice.

        Returns ``(H, W)`` (or ``(H, W, C)`` when ``rgb``), the other two spatial axes in array
        order. A 2D image is a single slice: ``slice(axis, 0)`` returns all of it.
        """
        axis = self._axis(axis)
        n = self.n_slices(axis)
        if not -n <= index < n:
            raise IndexError(f"slice {index} is out of range: axis {axis} has {n} slices.")
        if self.spatial_ndim == 2:
            return np.asarray(self.data[...])
        key: list[Any] = [slice(None)] * self.ndim
        key[axis] = int(index) % n
        return np.asarray(self.data[tuple(key)])

    # ---- constructors --------------------------------------------------------------------------

    @classmethod
    def from_array(
        cls,
        array: Any,
        *,
        spacing: Any = None,
        origin: Any = None,
        affine: Any = None,
        rgb: bool | None = None,
    ) -> ImageVolume:
        """Wrap an in-memory (or any array-like) image; spacing 1 and origin 0 unless given.

        ``rgb=None`` guesses: a ``uint8`` array of 3 or 4 axes whose last axis has 3 or 4 entries
        is RGB(A). Lists and other sequences are converted with ``numpy.asarray``.
        """
        if not all(hasattr(array, a) for a in ("shape", "dtype", "__getitem__")):
            array = np.asarray(array)
        shape = tuple(int(s) for s in array.shape)
        if rgb is None:
            rgb = _guess_rgb(shape, array.dtype)
        return cls(
            data=array,
            spacing=spacing,
            origin=origin,
            affine=affine,
            rgb=rgb,
            source=None,
            format="array",
        )
