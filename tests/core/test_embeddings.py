"""Tests of the embedding key, volume hash and the RAM + zarr embedding cache."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
import zarr

from napari_medsam import __version__
from napari_medsam.core.embeddings import EmbeddingCache, EmbeddingKey, chunk_checksum, hash_volume
from napari_medsam.core.errors import CacheMismatchError, MedSamError
from napari_medsam.core.progress import drain

EMB_SHAPE = (7, 8, 9)
N_SLICES = 5


def make_key(index: int = 0, **changes: object) -> EmbeddingKey:
    key = EmbeddingKey(
        content_hash="c0ffee",
        model="litemedsam",
        weights_hash="random-seed0",
        preprocess="ct:400/40|minmax|longest256",
        axis=0,
        index=index,
    )
    return dataclasses.replace(key, **changes)


def make_embedding(seed: int = 0, shape: tuple[int, ...] = EMB_SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def cache(tmp_path):
    return EmbeddingCache(tmp_path / "cache")


# ---------------------------------------------------------------------- key


def test_key_digests():
    key = make_key(3)
    assert key.version == __version__
    assert key.volume_id() == make_key(4).volume_id()
    assert key.digest() != make_key(4).digest()
    assert key.digest() == make_key(3).digest()
    assert key.volume_id() != make_key(3, axis=1).volume_id()
    # numpy integers are normalised, so the digest does not depend on the integer type
    assert make_key(np.int64(3), axis=np.int32(0)).digest() == key.digest()


# ---------------------------------------------------------------------- get / put


def test_miss_then_ram_hit(cache):
    key = make_key(2)
    assert cache.get(key) is None
    assert key not in cache
    cache.put(key, make_embedding(), n_slices=N_SLICES)
    assert key in cache
    out = cache.get(key)
    assert out is not None and out.dtype == np.float16 and out.shape == EMB_SHAPE
    stats = cache.stats
    assert (stats.misses, stats.hits_ram, stats.hits_disk) == (1, 1, 0)
    assert stats.ram_entries == 1 and stats.ram_bytes_used == out.nbytes


def test_float16_round_trip(cache, tmp_path):
    emb = make_embedding(1)
    cache.put(make_key(0), emb, n_slices=N_SLICES)
    emb[...] = 0  # the cache holds its own copy
    fresh = EmbeddingCache(tmp_path / "cache")
    out = fresh.get(make_key(0))
    assert out is not None and out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), make_embedding(1), rtol=1e-3, atol=1e-3)
    assert not out.flags.writeable


def test_disk_hit_in_new_instance(cache, tmp_path):
    cache.put(make_key(1), make_embedding(1), n_slices=N_SLICES)
    cache.put(make_key(3), make_embedding(3), n_slices=N_SLICES)
    fresh = EmbeddingCache(tmp_path / "cache")
    assert make_key(3) in fresh
    assert fresh.cached_indices(make_key(0)) == {1, 3}
    out = fresh.get(make_key(3))
    np.testing.assert_array_equal(out, make_embedding(3).astype(np.float16))
    assert fresh.get(make_key(2)) is None
    assert fresh.get(make_key(3)) is not None  # now from RAM
    stats = fresh.stats
    assert (stats.hits_disk, stats.hits_ram, stats.misses) == (1, 1, 1)


def test_disk_layout(cache, tmp_path):
    key = make_key(2)
    cache.put(key, make_embedding(), n_slices=N_SLICES)
    group = zarr.open_group(str(tmp_path / "cache" / key.volume_id()), mode="r")
    assert group.metadata.zarr_format == 3
    emb = group["embeddings"]
    assert emb.shape == (N_SLICES, *EMB_SHAPE) and emb.chunks == (1, *EMB_SHAPE)
    assert emb.dtype == np.float16
    flags = group["present"][:]
    assert flags.dtype == np.uint64 and list(flags != 0) == [False, False, True, False, False]
    assert int(flags[2]) == chunk_checksum(emb[2], 2)  # the checksum of the stored chunk
    attrs = dict(group.attrs)
    assert attrs["model"] == "litemedsam" and attrs["axis"] == 0 and attrs["version"] == __version__
    assert attrs["emb_shape"] == list(EMB_SHAPE) and attrs["n_slices"] == N_SLICES
    assert "index" not in attrs


@pytest.mark.parametrize(
    "change",
    [
        {"model": "medsam"},
        {"weights_hash": "random-seed1"},
        {"preprocess": "ct:1500/300|minmax|longest256"},
        {"axis": 2},
        {"content_hash": "beef"},
        {"version": "0.0.0"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_each_key_field_change_is_a_miss(cache, tmp_path, change):
    cache.put(make_key(0), make_embedding(), n_slices=N_SLICES)
    other = make_key(0, **change)
    assert other.volume_id() != make_key(0).volume_id()
    assert cache.get(other) is None
    assert other not in cache
    assert cache.cached_indices(other) == set()
    assert EmbeddingCache(tmp_path / "cache").get(other) is None


def test_tampered_attrs_raise(cache, tmp_path):
    key = make_key(0)
    cache.put(key, make_embedding(), n_slices=N_SLICES)
    folder = tmp_path / "cache" / key.volume_id()
    group = zarr.open_group(str(folder), mode="r+")
    group.attrs.update({"weights_hash": "something-else"})
    fresh = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(CacheMismatchError) as info:
        fresh.get(key)
    message = str(info.value)
    assert "weights_hash" in message and str(folder) in message and "--cache-dir" in message
    assert isinstance(info.value, MedSamError)
    with pytest.raises(CacheMismatchError):
        fresh.put(make_key(1), make_embedding(), n_slices=N_SLICES)


def test_shape_mismatch_put_raises(cache):
    cache.put(make_key(0), make_embedding(), n_slices=N_SLICES)
    with pytest.raises(CacheMismatchError, match="emb_shape"):
        cache.put(make_key(1), make_embedding(shape=(7, 8, 10)), n_slices=N_SLICES)
    with pytest.raises(CacheMismatchError, match="n_slices"):
        cache.put(make_key(1), make_embedding(), n_slices=N_SLICES + 1)
    assert make_key(1) not in cache
    with pytest.raises(ValueError, match="out of range"):
        cache.put(make_key(N_SLICES), make_embedding(), n_slices=N_SLICES)


def test_half_written_slice_is_a_miss(cache, tmp_path):
    key = make_key(1)
    cache.put(make_key(0), make_embedding(), n_slices=N_SLICES)
    # Simulate a process that died between writing slice 1's chunk and marking it present.
    group = zarr.open_group(str(tmp_path / "cache" / key.volume_id()), mode="r+")
    group["embeddings"][1] = make_embedding(5).astype(np.float16)
    fresh = EmbeddingCache(tmp_path / "cache")
    assert key not in fresh
    assert fresh.get(key) is None
    assert fresh.cached_indices(key) == {0}
    # A later put completes it.
    fresh.put(key, make_embedding(6), n_slices=N_SLICES)
    out = EmbeddingCache(tmp_path / "cache").get(key)
    np.testing.assert_array_equal(out, make_embedding(6).astype(np.float16))


# ---------------------------------------------------------------------- RAM LRU


def test_lru_byte_bound_and_eviction_order(tmp_path):
    entry_bytes = int(np.prod(EMB_SHAPE)) * 2  # float16
    cache = EmbeddingCache(tmp_path, ram_bytes=3 * entry_bytes + 10, disk=False)
    for i in range(3):
        cache.put(make_key(i), make_embedding(i), n_slices=N_SLICES)
    assert cache.get(make_key(0)) is not None  # 0 is now the most recent; 1 the oldest
    cache.put(make_key(3), make_embedding(3), n_slices=N_SLICES)
    stats = cache.stats
    assert stats.ram_entries == 3 and stats.ram_bytes_used <= 3 * entry_bytes + 10
    assert cache.get(make_key(1)) is None
    assert all(cache.get(make_key(i)) is not None for i in (0, 2, 3))
    assert cache.cached_indices(make_key(0)) == {0, 2, 3}
    cache.clear_ram()
    assert cache.stats.ram_entries == 0 and cache.stats.ram_bytes_used == 0
    assert cache.get(make_key(0)) is None  # RAM only: gone


def test_entry_larger_than_budget_not_kept(tmp_path):
    cache = EmbeddingCache(tmp_path, ram_bytes=100)
    cache.put(make_key(0), make_embedding(), n_slices=N_SLICES)
    assert cache.stats.ram_entries == 0 and cache.stats.ram_bytes_used == 0
    assert cache.get(make_key(0)) is not None  # from disk
    assert cache.stats.hits_disk == 1


def test_ram_disabled(tmp_path):
    cache = EmbeddingCache(tmp_path, ram_bytes=0)
    cache.put(make_key(0), make_embedding(), n_slices=N_SLICES)
    assert cache.stats.ram_entries == 0
    assert cache.get(make_key(0)) is not None
    assert cache.get(make_key(0)) is not None
    assert cache.stats.hits_disk == 2 and cache.stats.hits_ram == 0


def test_disk_false_writes_nothing(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache", disk=False)
    cache.put(make_key(0), make_embedding(), n_slices=N_SLICES)
    assert cache.get(make_key(0)) is not None
    assert not (tmp_path / "cache").exists()


def test_clear_disk_only_removes_stores(cache, tmp_path):
    cache.put(make_key(0), make_embedding(), n_slices=N_SLICES)
    keep = tmp_path / "cache" / "not-a-store"
    keep.mkdir()
    cache.clear_disk()
    cache.clear_ram()
    assert keep.exists()
    assert not (tmp_path / "cache" / make_key(0).volume_id()).exists()
    assert cache.get(make_key(0)) is None
    cache.put(make_key(0), make_embedding(), n_slices=N_SLICES)  # the store is recreated
    assert EmbeddingCache(tmp_path / "cache").get(make_key(0)) is not None


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = EmbeddingCache()
    assert cache.cache_dir.name == "embeddings"
    assert "napari-medsam" in cache.cache_dir.parts


def test_threads_put_different_indices(cache, tmp_path):
    n = 12
    errors: list[BaseException] = []

    def worker(indices: range) -> None:
        try:
            for i in indices:
                cache.put(make_key(i), make_embedding(i), n_slices=n)
                assert cache.get(make_key(i)) is not None
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(range(k, n, 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    fresh = EmbeddingCache(tmp_path / "cache")
    assert fresh.cached_indices(make_key(0)) == set(range(n))
    for i in range(n):
        np.testing.assert_array_equal(fresh.get(make_key(i)), make_embedding(i).astype(np.float16))


# ---------------------------------------------------------------------- hash_volume


def test_hash_volume_content():
    vol = np.random.default_rng(0).integers(0, 1000, (33, 34, 35)).astype(np.int16)
    digest = hash_volume(vol)
    assert len(digest) == 32
    assert hash_volume(vol.copy()) == digest
    assert hash_volume(vol, chunk_slices=5) == digest  # block size does not matter
    changed = vol.copy()
    changed[20, 3, 4] += 1
    assert hash_volume(changed) != digest
    assert hash_volume(vol.reshape(34, 33, 35)) != digest  # same bytes, other shape
    assert hash_volume(vol.view(np.uint16)) != digest  # same bytes, other dtype
    assert hash_volume(np.asfortranarray(vol)) == digest  # layout in memory does not matter
    assert hash_volume(vol, axis=2) != digest  # axis is part of the digest
    assert hash_volume(vol, axis=2) == hash_volume(vol.copy(), axis=2, chunk_slices=4)


def test_hash_volume_memmap_and_zarr(tmp_path):
    vol = np.random.default_rng(1).standard_normal((9, 10, 11)).astype(np.float32)
    digest = hash_volume(vol, chunk_slices=4)
    mm = np.memmap(tmp_path / "vol.raw", dtype=np.float32, mode="w+", shape=vol.shape)
    mm[:] = vol
    mm.flush()
    assert hash_volume(np.memmap(tmp_path / "vol.raw", dtype=np.float32, mode="r", shape=vol.shape)) == digest
    z = zarr.create_array(str(tmp_path / "vol.zarr"), shape=vol.shape, chunks=(2, 10, 11), dtype=np.float32)
    z[:] = vol
    assert hash_volume(z) == digest
    assert hash_volume(z, axis=1) == hash_volume(vol, axis=1)


def test_hash_volume_rejects_bad_arguments():
    with pytest.raises(ValueError, match="axis"):
        hash_volume(np.zeros((2, 3)), axis=2)
    with pytest.raises(ValueError, match="chunk_slices"):
        hash_volume(np.zeros((2, 3)), chunk_slices=0)


# ---------------------------------------------------------------------- verified chunks


def _chunk_file(root, key):
    files = [p for p in (root / key.volume_id() / "embeddings" / "c" / str(key.index)).rglob("*") if p.is_file()]
    assert len(files) == 1
    return files[0]


def _damage(kind, root, cache):
    """Damage slice 1's stored embedding the way the issue found it happen; returns its key."""
    key = make_key(1)
    chunk = _chunk_file(root, key)
    if kind == "flipped bytes":
        raw = bytearray(chunk.read_bytes())
        mid = len(raw) // 2
        raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
        chunk.write_bytes(bytes(raw))
    elif kind == "copied from another slice":
        chunk.write_bytes(_chunk_file(root, make_key(0)).read_bytes())
    elif kind == "deleted, flag kept":
        chunk.unlink()
    elif kind == "garbage":
        chunk.write_bytes(b"not a zstd frame at all")
    return key


@pytest.mark.parametrize("kind", ["flipped bytes", "copied from another slice", "deleted, flag kept", "garbage"])
def test_damaged_chunk_is_a_miss_and_rewritten(tmp_path, kind):
    root = tmp_path / "cache"
    first = EmbeddingCache(root)
    for i in (0, 1):
        first.put(make_key(i), make_embedding(i), n_slices=N_SLICES)
    key = _damage(kind, root, first)
    fresh = EmbeddingCache(root)
    assert key not in fresh  # what `embed` counts ...
    assert fresh.get(key) is None  # ... and what `segment` reads: both a miss
    assert fresh.stats.misses == 1 and fresh.stats.hits_disk == 0
    assert fresh.cached_indices(key) == {0, 1}  # the quick count sees the flag only
    assert fresh.get(make_key(0)) is not None  # the other slice is intact
    fresh.put(key, make_embedding(1), n_slices=N_SLICES)  # recomputed: the chunk is rewritten
    again = EmbeddingCache(root)
    assert key in again
    np.testing.assert_array_equal(again.get(key), make_embedding(1).astype(np.float16))


def test_store_of_the_unverified_format_is_rebuilt(tmp_path):
    root = tmp_path / "cache"
    cache = EmbeddingCache(root)
    key = make_key(0)
    cache.put(key, make_embedding(), n_slices=N_SLICES)
    meta = root / key.volume_id() / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format"] = "napari-medsam-embeddings/1"
    meta.write_text(json.dumps(doc))
    fresh = EmbeddingCache(root)
    assert fresh.get(key) is None  # rebuilt empty, not a CacheMismatchError
    fresh.put(key, make_embedding(), n_slices=N_SLICES)
    assert EmbeddingCache(root).get(key) is not None


def test_corrupt_chunk_gives_the_uncached_masks_and_is_rewritten(tmp_path, tiny_lite):
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.segment import Prompt2D, segment_slice

    vol = np.random.default_rng(3).integers(0, 900, (3, 40, 36)).astype(np.int16)
    prompt = Prompt2D.from_box((5, 6, 30, 28))
    uncached = segment_slice(VolumeEncoder(tiny_lite, vol), 1, [prompt])[0].mask
    root = tmp_path / "cache"
    enc = VolumeEncoder(tiny_lite, vol, cache=EmbeddingCache(root))
    assert drain(enc.embed())["computed"] == 3
    key = enc.key(1)
    chunk = _chunk_file(root, key)
    good = chunk.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    chunk.write_bytes(bytes(raw))
    again = VolumeEncoder(tiny_lite, vol, cache=EmbeddingCache(root))
    assert again.cached_indices() == {0, 1, 2}
    assert drain(again.embed())["computed"] == 1  # embed counts the corrupt chunk as a miss ...
    assert chunk.read_bytes() == good  # ... and rewrites it
    chunk.write_bytes(bytes(raw))
    third = VolumeEncoder(tiny_lite, vol, cache=EmbeddingCache(root))
    mask = segment_slice(third, 1, [prompt])[0].mask  # segment recomputes it too
    np.testing.assert_array_equal(mask, uncached)
    assert third.cache.stats.hits_disk == 0
    assert chunk.read_bytes() == good
