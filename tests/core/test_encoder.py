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
