"""Fixtures of the core tests."""

from __future__ import annotations

import pytest

from napari_medsam.core.build import load_model


@pytest.fixture(scope="module")
def loaded():
    """The tiny random LiteMedSAM-layout model in fp32 (one per test module: no state leaks between files)."""
    return load_model("test_tiny_lite", device="cpu", precision="fp32")
