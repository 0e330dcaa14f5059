from __future__ import annotations

import pytest

from napari_medsam.core.build import load_model

from ._contract import training_data


@pytest.fixture(scope="module")
def other():
    return load_model("test_tiny_vit", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def encoder_and_data(loaded):
    return training_data(loaded)
