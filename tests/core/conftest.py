"""Fixtures of the core tests."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from napari_medsam.core.build import load_model


@pytest.fixture(scope="module")
def loaded():
    """The tiny random LiteMedSAM-layout model in fp32 (one per test module: no state leaks between files)."""
    return load_model("test_tiny_lite", device="cpu", precision="fp32")


@pytest.fixture
def held_encoder(monkeypatch):
    """``gate.hold()``: from then on encoder calls wait (up to 20 s) for ``gate.release``;
    ``gate.started`` is set when one begins."""
    from napari_medsam.core import encoder as encoder_mod

    gate = SimpleNamespace(started=threading.Event(), release=threading.Event())
    real = encoder_mod.run_encoder

    def held(*a):
        gate.started.set()
        gate.release.wait(20)
        return real(*a)

    gate.hold = lambda: monkeypatch.setattr(encoder_mod, "run_encoder", held)
    yield gate
    gate.release.set()
