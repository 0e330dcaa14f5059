import threading

import numpy as np
import pytest

from napari_medsam.core import encoder as encoder_mod
from napari_medsam.core.embeddings import EmbeddingCache
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import Cancelled, InvalidImageError
from napari_medsam.core.preprocess import compute_intensity
from napari_medsam.core.progress import drain
from tests._helpers import drain_steps


@pytest.fixture()
def volume():
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 1000, size=(7, 33, 34)).astype(np.int16)


@pytest.fixture()
def counting(monkeypatch):
    calls = []
    real = encoder_mod.run_encoder

    def counted(loaded, batch):
        calls.append(batch.shape[0])
        return real(loaded, batch)

    monkeypatch.setattr(encoder_mod, "run_encoder", counted)
    return calls


def test_embed_then_hit_without_running_encoder(tiny_lite, volume, tmp_path, counting):
    cache = EmbeddingCache(tmp_path)
    enc = VolumeEncoder(tiny_lite, volume, axis=0, cache=cache, batch_size=3)
    steps, summary = drain_steps(enc.embed())
    assert summary["computed"] == 7 and summary["cached"] == 0
    assert sum(counting) == 7 and max(counting) == 3
    assert steps[-1].step == steps[-1].total == 7
    counting.clear()
    # a new process: new cache object on the same folder
    enc2 = VolumeEncoder(tiny_lite, volume, axis=0, cache=EmbeddingCache(tmp_path))
    assert drain(enc2.embed())["computed"] == 0 and not counting
    assert enc2.cached_indices() == set(range(7))


def test_batched_equals_single(tiny_lite, volume):
    a = VolumeEncoder(tiny_lite, volume, batch_size=4)
    drain(a.embed())
    b = VolumeEncoder(tiny_lite, volume, batch_size=1)
    for i in range(7):
        np.testing.assert_allclose(a.get(i).numpy(), b.get(i).numpy(), atol=2e-3)


def test_keys_separate_axes_windows_and_content(tiny_lite, volume, tmp_path):
    cache = EmbeddingCache(tmp_path)
    ax0 = VolumeEncoder(tiny_lite, volume, axis=0, cache=cache)
    ax1 = VolumeEncoder(tiny_lite, volume, axis=1, cache=cache)
    assert ax0.key(3) != ax1.key(3) and ax1.n_slices == 33 and ax1.slice_shape == (7, 34)
    lung = VolumeEncoder(tiny_lite, volume, cache=cache, intensity=compute_intensity(volume, "ct", window="lung"))
    assert lung.key(0) != ax0.key(0)
    changed = volume.copy()
    changed[6, 0, 0] += 1
    assert VolumeEncoder(tiny_lite, changed, cache=cache).key(0) != ax0.key(0)
    drain(ax0.embed([0]))
    assert ax0.is_cached(0) and not lung.is_cached(0) and not ax1.is_cached(0)


def test_cancel_between_batches(tiny_lite, volume):
    enc = VolumeEncoder(tiny_lite, volume, batch_size=2)
    stop = threading.Event()
    gen = enc.embed(cancel=stop)
    next(gen)
    next(gen)
    stop.set()
    with pytest.raises(Cancelled, match="stay cached"):
        next(gen)
    assert 0 < len(enc.cached_indices()) < 7


def test_2d_and_rgb_images(tiny_lite):
    grey = VolumeEncoder(tiny_lite, np.random.default_rng(1).random((40, 25)).astype(np.float32))
    assert grey.n_slices == 1 and grey.slice_shape == (40, 25)
    assert tuple(grey.get(0).shape) == (1, *tiny_lite.spec.embedding_shape)
    rgb = VolumeEncoder(tiny_lite, np.random.default_rng(1).integers(0, 255, (20, 30, 3)).astype(np.uint8))
    assert rgb.n_slices == 1 and rgb.slice_shape == (20, 30) and rgb.intensity.mode == "none"


def test_bad_inputs(tiny_lite, volume):
    with pytest.raises(InvalidImageError, match="axis"):
        VolumeEncoder(tiny_lite, volume, axis=3)
    enc = VolumeEncoder(tiny_lite, volume)
    with pytest.raises(InvalidImageError, match="outside"):
        enc.get(7)


def test_get_is_channels_last_and_keeps_the_last_slice(tiny_lite, volume):
    import torch

    ve = VolumeEncoder(tiny_lite, volume, axis=0)
    a = ve.get(2)
    assert a.shape == (1, *tiny_lite.spec.embedding_shape) and a.dtype == torch.float32
    assert a.is_contiguous(memory_format=torch.channels_last)
    cached = ve.cache.get(ve.key(2))
    np.testing.assert_array_equal(a[0].numpy(), cached.astype(np.float32))
    assert ve.get(2) is a  # the slice under view: no second conversion
    b = ve.get(3)
    assert b is not a and not torch.equal(a, b)
    np.testing.assert_array_equal(ve.get(2)[0].numpy(), cached.astype(np.float32))


class _Background:
    """``enc.embed(indices, yield_to=...)`` in a thread, told to give way until ``go()``."""

    def __init__(self, enc, indices, *, cancel=None):
        self.reached = threading.Event()  # the call reached a block boundary while asked to give way
        self.give_way = threading.Event()
        self.give_way.set()
        self.error = None
        self.result = None

        def yield_to():
            if self.give_way.is_set():
                self.reached.set()
            return self.give_way.is_set()

        def run():
            try:
                self.result = drain(enc.embed(indices, cancel=cancel, yield_to=yield_to))
            except BaseException as e:  # noqa: BLE001 - checked by the test
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.reached.wait(30)

    def go(self):
        self.give_way.clear()
        self.thread.join(30)
        assert not self.thread.is_alive()


def _in_thread(fn, timeout=30):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()), daemon=True)
    t.start()
    t.join(timeout)
    return box.get("out")


def test_a_background_call_gives_way_between_blocks(tiny_lite, volume, counting):
    enc = VolumeEncoder(tiny_lite, volume, axis=0)
    bg = _Background(enc, [0])  # paused inside its encoder call, before a block
    assert counting == [1]
    out = _in_thread(lambda: enc.get(3), timeout=20)  # the old lock held the whole slice: no deadlock now
    assert out is not None and enc.is_cached(3) and not enc.is_cached(0)
    bg.go()
    assert bg.error is None and enc.is_cached(0) and counting == [1, 1]
    ref = VolumeEncoder(tiny_lite, volume, axis=0)
    np.testing.assert_allclose(enc.get(0).numpy(), ref.get(0).numpy(), atol=1e-3)  # the resumed call is exact


def test_a_foreground_get_of_the_paused_slice_embeds_it_itself(tiny_lite, volume, counting):
    enc = VolumeEncoder(tiny_lite, volume, axis=0)
    bg = _Background(enc, [2])  # paused inside its call on slice 2 (a nice-19 thread in the product)
    out = _in_thread(lambda: enc.get(2), timeout=20)  # does not wait for the paused call
    assert out is not None and enc.is_cached(2) and counting == [1, 1]
    bg.go()
    assert bg.error is None and counting == [1, 1]  # the background call dropped the slice
    ref = VolumeEncoder(tiny_lite, volume, axis=0)
    np.testing.assert_allclose(enc.get(2).numpy(), ref.get(2).numpy(), atol=1e-3)


def test_a_background_call_abandons_slices_embedded_meanwhile(tiny_lite, volume, counting):
    enc = VolumeEncoder(tiny_lite, volume, axis=0)
    bg = _Background(enc, [1])
    assert _in_thread(lambda: drain(enc.embed([1])))["computed"] == 1  # a job that does not give way
    bg.go()
    assert bg.error is None and enc.is_cached(1) and counting == [1, 1]


def test_cancel_stops_a_paused_background_call(tiny_lite, volume):
    enc = VolumeEncoder(tiny_lite, volume, axis=0)
    cancel = threading.Event()
    bg = _Background(enc, [0, 1], cancel=cancel)
    cancel.set()
    bg.thread.join(10)
    assert not bg.thread.is_alive() and isinstance(bg.error, Cancelled) and not enc.cached_indices()


def test_checkpoints_do_nothing_on_other_threads(tiny_lite, volume):
    from napari_medsam.core.encoder import encoder_checkpoint, install_checkpoints, run_encoder

    x = np.zeros((1, 3, tiny_lite.spec.input_size, tiny_lite.spec.input_size), np.float32)
    calls = []
    with encoder_checkpoint(tiny_lite, lambda: calls.append(threading.current_thread().name)):
        run_encoder(tiny_lite, x)
        n = len(calls)
        _in_thread(lambda: run_encoder(tiny_lite, x))
    assert n > 1 and len(calls) == n  # every block of this thread's call, none of the other's
    run_encoder(tiny_lite, x)
    assert len(calls) == n and install_checkpoints(tiny_lite.model.image_encoder) == 0


def test_keys_and_cached_slices_never_wait_for_a_running_encoder_call(tiny_lite, volume, held_encoder):
    enc = VolumeEncoder(tiny_lite, volume, axis=0)
    drain(enc.embed([4]))
    held_encoder.hold()
    started, release = held_encoder.started, held_encoder.release
    bg = threading.Thread(target=lambda: drain(enc.embed([0])), daemon=True)  # holds the lock throughout
    bg.start()
    try:
        assert started.wait(10)
        out = _in_thread(lambda: (enc.is_cached(4), enc.get(4)), timeout=5)
        assert out is not None and out[0]  # a prompt on a cached slice does not wait for slice 0
    finally:
        release.set()
        bg.join(20)


def test_a_foreground_call_never_waits_for_another_calls_cache_write(tiny_lite, volume, monkeypatch):
    """The cache write (RAM and disk, 20-200 ms measured) runs outside the encoder lock: a box on a
    slice not embedded yet no longer waited for the prefetcher's disk write (up to 421 ms seen in
    the real window: benchmarks/bench_gui.py). The slice being written is served meanwhile."""
    enc = VolumeEncoder(tiny_lite, volume, axis=0)
    writing, finish = threading.Event(), threading.Event()
    real_put = enc.cache.put

    def slow_put(key, emb, *, n_slices):
        if key.index == 0:
            writing.set()
            assert finish.wait(20)
        real_put(key, emb, n_slices=n_slices)

    monkeypatch.setattr(enc.cache, "put", slow_put)
    bg = threading.Thread(target=lambda: drain(enc.embed([0])), daemon=True)
    bg.start()
    try:
        assert writing.wait(20)
        assert enc.is_cached(0) and 0 in enc.cached_indices()  # computed, still being written
        got = _in_thread(lambda: (enc.get(0), enc.get(3)), timeout=5)  # neither waits for the write
        assert got is not None and enc.key(0) not in enc.cache  # slice 0 came from the computed copy
    finally:
        finish.set()
        bg.join(20)
    assert enc.key(0) in enc.cache and not enc._fresh


def test_checkpoints_also_run_inside_blocks(tiny_lite):
    """A paused call waits at most one part of a block (attention, MLP, conv), not a whole block:
    LiteMedSAM's longest stretch between checkpoints was 56-97 ms by blocks alone (bf16 CPU)."""
    from torch import nn

    from napari_medsam.core.encoder import encoder_checkpoint, run_encoder

    blocks = sum(len(m) for m in tiny_lite.model.image_encoder.modules() if isinstance(m, nn.ModuleList))
    x = np.zeros((1, 3, tiny_lite.spec.input_size, tiny_lite.spec.input_size), np.float32)
    calls = []
    with encoder_checkpoint(tiny_lite, lambda: calls.append(1)):
        run_encoder(tiny_lite, x)
    assert len(calls) >= 2 * blocks


def test_last_pass_s_times_the_forward_of_a_slice_get_computed(tiny_lite, volume, monkeypatch):
    """``last_pass_s`` is the encoder forward alone (benchmarks/bench_gui.py subtracts it from a box's
    latency): not the cache write after it, and unchanged by a get that found the slice."""
    import time

    ve = VolumeEncoder(tiny_lite, volume, axis=0)
    assert ve.last_pass_s is None
    real = encoder_mod.run_encoder
    monkeypatch.setattr(encoder_mod, "run_encoder", lambda loaded, batch: (time.sleep(0.05), real(loaded, batch))[1])
    store = ve._store
    monkeypatch.setattr(ve, "_store", lambda items: (time.sleep(0.3), store(items))[1])
    ve.get(1)
    assert 0.05 <= ve.last_pass_s < 0.3  # the forward, not the 0.3 s write
    first = ve.last_pass_s
    ve.get(1)  # cached: no pass
    assert ve.last_pass_s == first
