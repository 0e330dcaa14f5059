"""The prefetch policy and the background prefetcher (tiny model, fast)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from napari_medsam.core import encoder as encoder_mod
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.prefetch import Prefetcher, prefetch_order
from napari_medsam.core.segment import Prompt2D, segment_slice


def test_order_is_nearest_first_with_more_ahead_than_behind():
    assert prefetch_order(10, 100, ahead=4, behind=2) == [10, 11, 12, 9, 13, 14, 8]
    assert prefetch_order(10, 100, ahead=4, behind=2, direction=-1) == [10, 9, 8, 11, 7, 6, 12]
    assert prefetch_order(5, 100, ahead=2, behind=2) == [5, 6, 4, 7, 3]


def test_order_is_clipped_to_the_volume():
    assert prefetch_order(0, 3, ahead=5, behind=5) == [0, 1, 2]
    assert prefetch_order(2, 3, ahead=5, behind=5, direction=1) == [2, 1, 0]
    assert prefetch_order(7, 3) == [] and prefetch_order(0, 0) == []
    assert prefetch_order(1, 3, ahead=0, behind=0) == [1]


@pytest.fixture()
def volume():
    return np.random.default_rng(0).integers(-500, 500, size=(12, 20, 22)).astype(np.int16)


def test_prefetcher_embeds_the_neighbourhood_then_idles(tiny_lite, volume):
    enc = VolumeEncoder(tiny_lite, volume)
    ready = []
    pf = Prefetcher(enc, ahead=3, behind=1, on_ready=ready.append).start()
    try:
        pf.update(5)
        assert pf.wait_idle(30)
        assert enc.cached_indices() == {4, 5, 6, 7, 8}
        assert sorted(ready) == [4, 5, 6, 7, 8] and ready[0] == 5
        assert pf.pending() == [] and pf.computed == 5
        # moving down: the look-ahead follows the direction of browsing
        pf.update(3)
        assert pf.wait_idle(30)
        assert enc.cached_indices() == {0, 1, 2, 3, 4, 5, 6, 7, 8}
    finally:
        pf.close()
    assert not pf.running


def test_prefetched_slices_answer_without_the_encoder(tiny_lite, volume, monkeypatch):
    enc = VolumeEncoder(tiny_lite, volume)
    pf = Prefetcher(enc, ahead=2, behind=0).start()
    try:
        pf.update(0)
        assert pf.wait_idle(30)
    finally:
        pf.close()
    calls = []
    monkeypatch.setattr(encoder_mod, "run_encoder", lambda *a: calls.append(a))
    res = segment_slice(enc, 2, [Prompt2D.from_box((2, 2, 15, 15))])
    assert res[0].mask.shape == (20, 22) and not calls


def test_paused_prefetcher_starts_no_encoder_call(tiny_lite, volume, monkeypatch):
    enc = VolumeEncoder(tiny_lite, volume)
    calls = []
    real = encoder_mod.run_encoder
    monkeypatch.setattr(encoder_mod, "run_encoder", lambda *a: calls.append(1) or real(*a))
    pf = Prefetcher(enc, ahead=2, behind=0).start()
    try:
        with pf.paused():
            pf.update(4)
            time.sleep(0.3)
            assert not calls
        assert pf.wait_idle(30)
        assert len(calls) == 3
    finally:
        pf.close()


def test_stop_ends_the_worker_between_batches(tiny_lite, volume, held_encoder):
    enc = VolumeEncoder(tiny_lite, volume)
    held_encoder.hold()
    started, release = held_encoder.started, held_encoder.release
    pf = Prefetcher(enc, ahead=8, behind=8).start()
    pf.update(6)
    assert started.wait(10)
    stopper = threading.Thread(target=pf.stop)
    stopper.start()
    release.set()
    stopper.join(10)
    assert not pf.running
    assert len(enc.cached_indices()) <= 2  # the running call finished; nothing new started


def test_errors_stop_the_prefetcher_and_are_reported(tiny_lite, volume, monkeypatch):
    from napari_medsam.core.errors import MedSamError

    enc = VolumeEncoder(tiny_lite, volume)

    def broken(*a):
        raise MedSamError("disk full")

    monkeypatch.setattr(encoder_mod, "run_encoder", broken)
    errors = []
    pf = Prefetcher(enc, on_error=errors.append).start()
    pf.update(1)
    assert pf.wait_idle(10)
    for _ in range(100):
        if not pf.running:
            break
        time.sleep(0.05)
    assert not pf.running and isinstance(pf.error, MedSamError) and errors == [pf.error]
    pf.close()


@pytest.mark.skipif(not hasattr(os, "getpriority") or not hasattr(threading, "get_native_id"),
                    reason="per-thread nice values are a Linux feature")
def test_prefetch_thread_runs_at_low_priority(tiny_lite, volume):
    if os.getpriority(os.PRIO_PROCESS, 0) > 14:
        pytest.skip("the test process already runs at the lowest priority")
    enc = VolumeEncoder(tiny_lite, volume)
    seen = []

    def ready(i):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    pf = Prefetcher(enc, ahead=0, behind=0, on_ready=ready, nice=5).start()
    try:
        pf.update(0)
        assert pf.wait_idle(30)
    finally:
        pf.close()
    assert seen and seen[0] >= os.getpriority(os.PRIO_PROCESS, 0) + 1
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < seen[0]  # ours is untouched


_EXIT_SCRIPT = """
import threading, time, numpy as np, torch
from napari_medsam.core import encoder as encoder_mod, prefetch
from napari_medsam.core.build import load_model
from napari_medsam.core.encoder import VolumeEncoder
real = encoder_mod.run_encoder
started = threading.Event()
def busy(loaded, batch):  # a long call inside torch's C++ code
    started.set()
    a = torch.randn(1000, 1000)
    for _ in range(30):
        a = torch.tanh(a @ a / 1000)
    return real(loaded, batch)
encoder_mod.run_encoder = busy
enc = VolumeEncoder(load_model("test_tiny_lite", device="cpu"), np.random.rand(20, 24, 24).astype(np.float32))
pf = prefetch.Prefetcher(enc).start()
pf.update(5)
started.wait(30)
time.sleep(0.3)
print("exiting while the prefetcher embeds", flush=True)
"""


def test_exiting_while_a_prefetcher_embeds_does_not_abort():
    """A daemon thread killed inside torch at interpreter exit aborts the process; the atexit hook
    stops and waits for the prefetcher first (without it this script exits with SIGABRT)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "exiting" in out.stdout
