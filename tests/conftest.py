"""Shared fixtures: real data shipped by installed packages, tiny models, isolated caches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def _nilearn_data() -> Path:
    spec = importlib.util.find_spec("nilearn")
    assert spec is not None and spec.submodule_search_locations, "nilearn is a test dependency"
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


MNI_T1 = _nilearn_data() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = _nilearn_data() / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = _nilearn_data() / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write to the user's real cache from tests."""
    monkeypatch.setenv("NAPARI_MEDSAM_CACHE", str(tmp_path_factory.mktemp("medsam-cache")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    # napari in a child process (and the docks' reader preference) never touches the user's settings
    monkeypatch.setenv("NAPARI_CONFIG", str(tmp_path_factory.mktemp("napari-config") / "settings.yaml"))


@pytest.fixture(scope="session")
def mni():
    """The MNI152 T1 template with a brain mask (grey + white matter probability > 0.5)."""
    import nibabel as nib

    t1 = nib.load(MNI_T1)
    gm = np.asanyarray(nib.load(MNI_GM).dataobj, dtype=np.float32)
    wm = np.asanyarray(nib.load(MNI_WM).dataobj, dtype=np.float32)
    return {"path": MNI_T1, "t1": np.asanyarray(t1.dataobj), "affine": t1.affine,
            "brain": (gm + wm) > 0.5, "gm": gm, "wm": wm}


@pytest.fixture(scope="session")
def tiny_lite():
    from napari_medsam.core.build import load_model

    return load_model("test_tiny_lite", device="cpu")


@pytest.fixture(scope="session")
def litemedsam():
    from napari_medsam.core.build import load_model

    return load_model("litemedsam", device="cpu", precision="fp32")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)
