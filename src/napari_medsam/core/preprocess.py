"""From raw scan intensities to a model's input tensor, and from its masks back to the scan's pixels.

Two steps, kept apart because they have different scopes:

1. :class:`Intensity` maps raw values (uint8/uint16, int16 Hounsfield units, float with NaN/inf)
   to 0-255 with a CT window or MR percentile clipping. Its range is fixed once per *volume*
   (so that every slice is treated alike) and is part of the embedding cache key.
2. :func:`prepare_slice` applies the model's own resize (longest side + pad, or squash) and
   normalisation (ImageNet mean/std on 0-255, or min-max to [0, 1]). :class:`SliceTransform` maps
   ``(row, col)`` prompts into the model frame and masks back to the original pixel grid exactly.

Each model's published pipeline is reproduced exactly (``ModelSpec.pipeline``):

* ``litemedsam``: uint8 image, longest side to 256 with area averaging (OpenCV's INTER_AREA),
  min-max per resized slice, zero pad bottom/right, boxes scaled by the same factor; logits
  (256 px, the input size) cropped and resized bilinearly to the slice.
* ``sam`` (SAM ViT-B/L/H, MobileSAM: segment-anything's ``SamPredictor``): ``ResizeLongestSide``,
  i.e. PIL's bilinear resize of the uint8 image (via torchvision), ImageNet mean/std on 0-255,
  zero pad bottom/right; prompts scaled per axis by ``new/old`` of the rounded resized size; logits
  upscaled bilinearly to the 1024 input, cropped to the resized image, resized bilinearly to the slice.
* ``medsam`` (``MedSAM_Inference.py``): scikit-image's ``resize(order=3, anti_aliasing=True,
  preserve_range=True)`` to 1024 x 1024 then ``astype(uint8)``, min-max over the 1024 image, boxes
  ``/ [W, H, W, H] * 1024``; masks are ``bilinear(sigmoid(logits)) > 0.5`` (see ``segment.decode``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import InvalidImageError
from .registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

#: CT window presets as (width, level) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
MR_PERCENTILES = (0.5, 99.5)

IntensityMode = Literal["auto", "ct", "mr", "minmax", "none"]


@dataclass(frozen=True)
class Intensity:
    """A fixed mapping of raw intensities to 0-255: clip to ``[lo, hi]`` and scale.

    ``keep_zero`` keeps voxels that were exactly 0 at 0 (MR background, as MedSAM does).
    ``mode == "none"`` passes 0-255 data (RGB photos, uint8 slices) through unchanged.
    """

    mode: str
    lo: float
    hi: float
    keep_zero: bool = False

    def key(self) -> str:
        return f"{self.mode}:{self.lo:.6g}/{self.hi:.6g}{'|z0' if self.keep_zero else ''}"

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Map raw values to float32 in [0, 255]; NaN -> lo, +inf -> hi, -inf -> lo."""
        x = np.asarray(data, dtype=np.float32)
        if self.mode == "none":
            return np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)
        x = np.nan_to_num(x, nan=self.lo, posinf=self.hi, neginf=self.lo)
        scale = 255.0 / max(self.hi - self.lo, 1e-8)
        out = (np.clip(x, self.lo, self.hi) - self.lo) * scale
        if self.keep_zero:
            out[x == 0] = 0.0
        return out


def _sample(volume: Any, *, axis: int = 0, max_slices: int = 48) -> np.ndarray:
    """Finite values of up to ``max_slices`` evenly spaced slices (bounded memory on big volumes)."""
    shape = volume.shape
    if len(shape) > 2 and not -len(shape) <= axis < len(shape):
        raise InvalidImageError(
            f"slice axis {axis} does not exist in an image of shape {tuple(shape)}: use an axis "
            f"0..{len(shape) - 1} (CLI: --axis; for a head, the axis it was trained on)")
    if len(shape) <= 2:
        arr = np.asarray(volume[...], dtype=np.float32)
    else:
        n = shape[axis]
        idx = np.unique(np.linspace(0, n - 1, min(n, max_slices)).round().astype(int))
        sl: list[Any] = [slice(None)] * len(shape)
        parts = []
        for i in idx:
            sl[axis] = int(i)
            parts.append(np.asarray(volume[tuple(sl)], dtype=np.float32).ravel())
        arr = np.concatenate(parts)
    return arr[np.isfinite(arr)].ravel()


def looks_like_ct(volume: Any, *, axis: int = 0) -> bool:
    """Signed integer data reaching below -500 are Hounsfield units (air is -1000)."""
    if not np.issubdtype(np.dtype(volume.dtype), np.signedinteger) and not np.issubdtype(
        np.dtype(volume.dtype), np.floating
    ):
        return False
    s = _sample(volume, axis=axis, max_slices=16)
    return s.size > 0 and float(s.min()) <= -500 and float(s.max()) >= 100


def compute_intensity(volume: Any, mode: str = "auto", *, window: str | tuple[float, float] | None = None,
                      percentiles: tuple[float, float] = MR_PERCENTILES, axis: int = 0,
                      rgb: bool = False) -> Intensity:
    """Choose the intensity mapping of a whole volume (or 2D image).

    ``auto``: RGB or uint8 data pass through; binary and few-valued images (at most
    :data:`FEW_VALUES` distinct values, e.g. 0/100 int16) get min-max, which keeps their contrast;
    CT-looking data get the soft-tissue window; anything else gets MR percentile clipping over
    non-zero voxels (min-max when those percentiles collapse to one value). A constant or all-NaN
    image is logged as a warning: there is nothing to segment. ``ct`` takes ``window`` (a preset name or
    ``(width, level)``); ``mr`` takes ``percentiles``; ``minmax`` uses the data's full range.
    """
    mode = (mode or "auto").lower()
    if rgb:
        return Intensity("none", 0.0, 255.0)
    s = _sample(volume, axis=axis)
    few = _warn_if_degenerate(s, volume)
    if mode == "auto":
        if few and window is None:
            # Binary / few-valued images (masks, phantoms, 0/100 int16): percentiles over the non-zero
            # voxels would map every one of them to the same grey; min-max keeps their contrast.
            mode = "minmax"
        elif np.dtype(volume.dtype) == np.uint8:
            return Intensity("none", 0.0, 255.0)
        else:
            mode = "ct" if (window is not None or looks_like_ct(volume, axis=axis)) else "mr"
    if mode == "none":
        return Intensity("none", 0.0, 255.0)
    if mode == "ct":
        w = window if window is not None else "soft_tissue"
        if isinstance(w, str):
            if w not in CT_WINDOWS:
                raise InvalidImageError(f"unknown CT window {w!r}; presets: {', '.join(CT_WINDOWS)}")
            width, level = CT_WINDOWS[w]
        else:
            width, level = float(w[0]), float(w[1])
        if width <= 0:
            raise InvalidImageError(f"CT window width must be positive, got {width}")
        return Intensity("ct", level - width / 2, level + width / 2)
    if s.size == 0:
        return Intensity("minmax", 0.0, 1.0)
    if mode == "mr":
        nz = s[s != 0]
        nz = nz if nz.size else s
        lo, hi = np.percentile(nz, percentiles)
        if hi > lo or float(s.min()) == float(s.max()):
            return Intensity("mr", float(lo), float(max(hi, lo + 1e-6)), keep_zero=True)
        mode = "minmax"  # the percentiles collapse to one value: they would erase the contrast
    if mode == "minmax":
        return Intensity("minmax", float(s.min()), float(max(s.max(), s.min() + 1e-6)))
    raise InvalidImageError(f"unknown intensity mode {mode!r}; use auto, ct, mr, minmax or none")


#: At most this many distinct values (on the sampled slices) make an image "few-valued" (binary masks,
#: phantoms, label-like images): auto intensity maps them min-max instead of by percentiles.
FEW_VALUES = 16


def _warn_if_degenerate(s: np.ndarray, volume: Any) -> bool:
    """Log a warning (the CLI prints it) for an image with nothing to segment; return whether it has
    2 to :data:`FEW_VALUES` distinct values."""
    import logging

    log = logging.getLogger(__name__)
    shape = tuple(int(v) for v in volume.shape)
    if s.size == 0:
        log.warning("the image of shape %s holds no finite value (all NaN or infinite): there is nothing to "
                    "segment; check the file or its scaling", shape)
        return False
    lo, hi = float(s.min()), float(s.max())
    if lo == hi:
        log.warning("the image of shape %s holds the single value %g on every sampled slice: there is nothing "
                    "to segment; check the file, or for a zarr its missing chunks", shape, lo)
        return False
    step = max(1, s.size // 262144)  # bounded cost; min and max are counted exactly
    values = np.union1d(np.unique(s[::step]), [lo, hi])
    return values.size <= FEW_VALUES


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of area-averaging resampling (OpenCV INTER_AREA when shrinking)."""
    if n_in < 1 or n_out < 1:
        raise InvalidImageError(f"cannot resample {n_in} pixels to {n_out}: a slice side must be at least 1")
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        a, b = i * scale, (i + 1) * scale
        j0, j1 = int(np.floor(a)), min(int(np.ceil(b)), n_in)
        for j in range(j0, j1):
            m[i, j] = min(b, j + 1) - max(a, j)
    return (m / scale).astype(np.float32)


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation with half-pixel centres (enlarging)."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        x = min(max((i + 0.5) * scale - 0.5, 0.0), n_in - 1)
        j0 = int(np.floor(x))
        j1 = min(j0 + 1, n_in - 1)
        f = x - j0
        m[i, j0] += 1 - f
        m[i, j1] += f
    return m


_MATRICES: dict[tuple[int, int], np.ndarray] = {}


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Area averaging when shrinking, linear when enlarging; memoised."""
    key = (n_in, n_out)
    if key not in _MATRICES:
        if n_in == n_out:
            _MATRICES[key] = np.eye(n_in, dtype=np.float32)
        else:
            _MATRICES[key] = _area_matrix(n_in, n_out) if n_out < n_in else _linear_matrix(n_in, n_out)
    return _MATRICES[key]


def resize_2d(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Separable resize of ``(H, W)`` or ``(H, W, C)`` float32 data to ``out_hw``."""
    my = resample_matrix(img.shape[0], out_hw[0])
    mx = resample_matrix(img.shape[1], out_hw[1])
    if img.ndim == 2:
        return my @ img @ mx.T
    return np.einsum("ih,hwc,jw->ijc", my, img, mx, optimize=True)


@dataclass(frozen=True)
class SliceTransform:
    """Geometry of one slice's trip into a model's input frame and back.

    ``original``: (H, W) of the slice; ``resized``: (h, w) of the image content inside the
    ``input_size`` square (top-left aligned; the rest is padding for ``longest``).
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    input_size: int
    squash: bool = False
    pipeline: str = "litemedsam"  # ModelSpec.pipeline: whose published pre/postprocessing

    @classmethod
    def for_model(cls, original: tuple[int, int], spec: ModelSpec) -> SliceTransform:
        h, w = int(original[0]), int(original[1])
        s = spec.input_size
        if spec.resize == "squash":
            return cls((h, w), (s, s), s, squash=True, pipeline=spec.pipeline)
        if min(h, w) < 1:
            raise InvalidImageError(f"empty slice of shape {(h, w)}: nothing to segment")
        scale = s / max(h, w)
        # a very elongated slice (1 x 4000) keeps at least one row / column in the model frame
        return cls((h, w), (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))), s, pipeline=spec.pipeline)

    @property
    def scale_rc(self) -> tuple[float, float]:
        """Row and column scale factors from original pixels to the model frame.

        LiteMedSAM's longest-side resizing uses one factor for both axes (``input_size / max(H, W)``),
        as its pipeline scales boxes; SAM's ``ResizeLongestSide.apply_coords`` and squashing scale
        each axis by its own ``resized / original``.
        """
        if self.squash or self.pipeline == "sam":
            return self.resized[0] / self.original[0], self.resized[1] / self.original[1]
        f = self.input_size / max(self.original)
        return f, f

    def rc_to_model(self, rc: np.ndarray) -> np.ndarray:
        """``(N, 2)`` (row, col) original pixels -> (row, col) in the model's input frame."""
        rc = np.asarray(rc, dtype=np.float32).reshape(-1, 2)
        sy, sx = self.scale_rc
        return rc * np.array([sy, sx], dtype=np.float32)

    def box_to_model(self, box: np.ndarray) -> np.ndarray:
        """``(N, 4)`` boxes (r0, c0, r1, c1) in original pixels -> same order in the model frame."""
        box = np.asarray(box, dtype=np.float32).reshape(-1, 4)
        sy, sx = self.scale_rc
        return box * np.array([sy, sx, sy, sx], dtype=np.float32)

    def logits_to_original(self, logits: Any) -> Any:
        """Model-frame logits ``(..., S', S')`` (any S') -> ``(..., H, W)`` on the original grid (torch).

        Crops the padding first (in the logits' own resolution), then bilinear to (H, W). SAM's
        pipeline (``Sam.postprocess_masks``) first upscales bilinearly to the input frame, then crops.
        """
        import torch.nn.functional as F

        side = logits.shape[-1]
        if self.pipeline == "sam" and side != self.input_size:
            lead = logits.shape[:-2]
            x = logits.reshape(-1, 1, side, side).float()
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
            logits = x.reshape(*lead, self.input_size, self.input_size)
            side = self.input_size
        f = side / self.input_size
        h = max(1, round(self.resized[0] * f))
        w = max(1, round(self.resized[1] * f))
        x = logits[..., :h, :w]
        lead = x.shape[:-2]
        x = x.reshape(-1, 1, h, w).float()
        x = F.interpolate(x, size=self.original, mode="bilinear", align_corners=False)
        return x.reshape(*lead, *self.original)

    def mask_to_model_lowres(self, mask: np.ndarray, side: int) -> np.ndarray:
        """A binary/float ``(H, W)`` mask in original pixels -> ``(side, side)`` in the model frame (padded)."""
        f = side / self.input_size
        h = max(1, round(self.resized[0] * f))
        w = max(1, round(self.resized[1] * f))
        out = np.zeros((side, side), dtype=np.float32)
        out[:h, :w] = resize_2d(np.asarray(mask, dtype=np.float32), (h, w))
        return out


def to_model_input(img255: np.ndarray, spec: ModelSpec) -> tuple[np.ndarray, SliceTransform]:
    """A 0-255 float slice ``(H, W)`` or ``(H, W, 3)`` -> ``(3, S, S)`` float32 input and its transform."""
    if img255.ndim == 3 and img255.shape[-1] == 4:
        img255 = img255[..., :3]
    if img255.ndim not in (2, 3) or (img255.ndim == 3 and img255.shape[-1] != 3):
        raise InvalidImageError(f"a slice must be (H, W) or (H, W, 3), got shape {img255.shape}")
    if min(img255.shape[:2]) < 1:
        raise InvalidImageError(f"empty slice of shape {img255.shape}")
    tf = SliceTransform.for_model(img255.shape[:2], spec)
    # Every released model saw uint8 images resized as uint8 (np.uint8 truncates, OpenCV's and PIL's
    # resizes round): quantise the same way so that embeddings match the published pipelines.
    img255 = np.floor(np.clip(img255, 0, 255))
    rgb = img255 if img255.ndim == 3 else np.repeat(img255[..., None], 3, axis=-1)
    if spec.pipeline == "sam":
        resized = pil_bilinear(img255.astype(np.uint8), tf.resized).astype(np.float32)
        if resized.ndim == 2:
            resized = np.repeat(resized[..., None], 3, axis=-1)
    elif spec.pipeline == "medsam":
        resized = skimage_bicubic(img255.astype(np.uint8), tf.resized).astype(np.float32)
        if resized.ndim == 2:
            resized = np.repeat(resized[..., None], 3, axis=-1)
    else:
        resized = np.round(resize_2d(rgb.astype(np.float32), tf.resized))  # (h, w, 3)
    if spec.normalization == "minmax":
        lo, hi = float(resized.min()), float(resized.max())
        norm = (resized - lo) / max(hi - lo, 1e-8)
    else:
        norm = (resized - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    out = np.zeros((3, spec.input_size, spec.input_size), dtype=np.float32)
    out[:, : tf.resized[0], : tf.resized[1]] = norm.transpose(2, 0, 1)
    return out, tf


def pil_bilinear(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """segment-anything's ``ResizeLongestSide.apply_image``: PIL's bilinear resize of a uint8 image.

    ``img`` is ``(H, W)`` or ``(H, W, 3)`` uint8; the result has the same layout at ``out_hw``. PIL
    works per channel in fixed point, so a grey slice resized once equals each channel of its RGB copy.
    """
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(img))
    return np.asarray(pil.resize((out_hw[1], out_hw[0]), Image.Resampling.BILINEAR))


def skimage_bicubic(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """MedSAM's ``skimage.transform.resize(img, out_hw, order=3, preserve_range=True,
    anti_aliasing=True).astype(np.uint8)`` of a uint8 image, through scipy.ndimage as scikit-image
    calls it (Gaussian pre-filter where shrinking, cubic-spline zoom, scikit-image's mode "reflect"
    = ndimage's "mirror", clipped to the input's range, truncated to uint8).

    MedSAM resizes the grey slice repeated to RGB; a grey ``(H, W)`` slice is resized once (20x
    faster than three channels, and the same bytes on the MNI slices of the equivalence tests).
    """
    from scipy import ndimage as ndi

    x = img.astype(np.float64)
    factors = np.divide(x.shape, tuple(out_hw) + x.shape[2:])
    sigma = np.maximum(0, (factors - 1) / 2)
    if np.any(sigma > 0):
        x = ndi.gaussian_filter(x, sigma, cval=0.0, mode="mirror")
    out = ndi.zoom(x, 1 / factors, order=3, mode="mirror", cval=0.0, grid_mode=True)
    np.clip(out, img.min(), img.max(), out=out)
    return out.astype(np.uint8)


def preprocess_key(intensity: Intensity, spec: ModelSpec) -> str:
    """Canonical string naming every preprocessing choice that changes an embedding.

    ``v1``: LiteMedSAM's pipeline (and everything cached before the SAM and MedSAM pipelines were
    reproduced); those models' keys name their pipeline, so older embeddings of them are not reused.
    """
    version = "v1" if spec.pipeline == "litemedsam" else f"v2-{spec.pipeline}"
    return f"{intensity.key()}|{spec.normalization}|{spec.resize}{spec.input_size}|{version}"
