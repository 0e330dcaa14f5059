"""npe2 sample data: the real MNI152 T1 template that nilearn ships, and a small synthetic volume.

The MNI file is found through ``importlib.util.find_spec("nilearn")`` without importing nilearn,
and read through the plugin's own reader, so the sample carries its real NIfTI geometry.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

MNI_RELATIVE = Path("datasets") / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def mni152_path() -> Path:
    """Path of nilearn's MNI152 2009a T1 template (197 x 233 x 189, 1 mm); no import of nilearn."""
    from .core.errors import ImageReadError

    try:
        spec = importlib.util.find_spec("nilearn")
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(root) / MNI_RELATIVE
        if candidate.is_file():
            return candidate
    raise ImageReadError(
        "The MNI152 sample ships with nilearn, which is not installed: `pip install nilearn` "
        "(or open your own scan with File > Open)."
    )


def make_mni152_sample() -> list[tuple[Any, dict[str, Any], str]]:
    """The MNI152 T1 template as an Image layer at its 1 mm geometry."""
    from ._reader import read_layers

    data, kwargs, kind = read_layers(str(mni152_path()))[0]
    kwargs["name"] = "MNI152 T1"
    return [(data, kwargs, kind)]


def synthetic_volume(shape: tuple[int, int, int] = (32, 96, 96), *, seed: int = 0) -> np.ndarray:
    """A CT-like int16 volume in Hounsfield units: a body ellipse (soft tissue), two 'organs' and a
    bright 'bone' rod, with noise. Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    vol = np.full(shape, -1000.0)  # air
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    vol[body] = 30.0  # soft tissue
    organ = ((y + 0.15) / 0.35) ** 2 + ((x - 0.35) / 0.3) ** 2 + (z / 0.75) ** 2 < 1
    vol[organ] = 140.0  # enhancing organ (e.g. liver)
    cyst = ((y - 0.3) / 0.2) ** 2 + ((x + 0.3) / 0.2) ** 2 + (z / 0.6) ** 2 < 1
    vol[cyst] = -60.0  # fluid / fat
    bone = ((y - 0.55) / 0.1) ** 2 + (x / 0.12) ** 2 < 1
    vol[bone & body] = 900.0
    vol += rng.normal(0.0, 12.0, size=shape)
    return vol.astype(np.int16)


def make_synthetic_sample() -> list[tuple[Any, dict[str, Any], str]]:
    """A 32 x 96 x 96 synthetic CT with anisotropic 2.5 x 0.8 x 0.8 mm voxels."""
    from . import _layers
    from .io import ImageVolume

    volume = ImageVolume.from_array(synthetic_volume(), spacing=(2.5, 0.8, 0.8), origin=(0.0, -38.4, -38.4))
    data, kwargs, kind = _layers.image_layer_data(volume, name="synthetic CT")
    return [(data, kwargs, kind)]
