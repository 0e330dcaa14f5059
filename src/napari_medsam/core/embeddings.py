"""Per-slice image embeddings: a key that names everything that changes them, and a cache.

An :class:`EmbeddingKey` holds the content hash of the volume, the model, the weights hash, the
preprocessing, the slice axis, the slice index and the package version. Any difference gives a
different key, so a stale embedding is never silently reused.

:class:`EmbeddingCache` keeps embeddings in a RAM LRU (bounded in bytes) over an fp16 zarr store on
disk (zarr format 3), one store per volume::

    <cache_dir>/<volume_id>/            zarr group; attrs: the key fields except index,
                                        emb_shape, n_slices, format
        embeddings  (n_slices, *emb_shape) float16, chunks (1, *emb_shape): one chunk file per slice
        present     (n_slices,) uint64, chunks (1,): one tiny chunk file per slice (present/c/<i>),
                    written only after that slice's embedding chunk; 0 (the fill value, no file)
                    means absent, else it is the slice's checksum (:func:`chunk_checksum`)

Verified reads: a slice counts as cached only when its flag exists *and* the embedding read back
matches the checksum in the flag (CRC-32 of the float16 bytes, seeded with the slice index). A
corrupt, truncated, deleted or undecodable chunk, or one copied over another slice's, is a miss:
it is recomputed and rewritten, never used. ``get``, ``in`` and :meth:`EmbeddingCache.embed` (through
``in``) all count the same way.

Crash and concurrency safety: a slice's embedding chunk is written first and its ``present`` flag
after, so a slice whose write was interrupted reads as absent (zarr's local store also writes each
chunk file atomically through a temporary file and a rename). Because ``present`` has one chunk per
slice, marking slice *i* writes only *i*'s flag file: there is no read-modify-write of a shared
array, so two processes filling different slices of one store cannot undo each other's flags.
Within a process a lock per store serialises its disk access. A new store is built in a temporary
folder and renamed into place, so a store folder is either complete or absent.

Everything read from disk (and from RAM) is float16 exactly as stored; callers cast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medsam import __version__
from napari_medsam.core.errors import CacheMismatchError

__all__ = ["CacheStats", "EmbeddingCache", "EmbeddingKey", "chunk_checksum", "hash_volume"]

_log = logging.getLogger(__name__)

STORE_FORMAT = "napari-medsam-embeddings/2"
_OLD_FORMATS = ("napari-medsam-embeddings/1",)  # unverified flags: such a store is rebuilt
_STORE_DTYPE = np.float16
_VOLUME_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_TMP_PREFIX = ".tmp-"
_MAX_OPEN_STORES = 8
# Key fields stored in a volume store's attrs (every field except ``index``).
_VOLUME_FIELDS = ("content_hash", "model", "weights_hash", "preprocess", "axis", "version")


def chunk_checksum(array: np.ndarray, index: int) -> int:
    """The non-zero uint64 stored as slice ``index``'s flag: CRC-32 of its float16 bytes, seeded with
    the index (so a chunk copied over another slice's does not verify), with bit 32 set."""
    import zlib

    data = np.ascontiguousarray(array, dtype=_STORE_DTYPE)
    return (1 << 32) | zlib.crc32(data.data.cast("B"), zlib.crc32(int(index).to_bytes(8, "little")))


def _hex_digest(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@dataclass(frozen=True)
class EmbeddingKey:
    """Everything that changes the embedding of one slice.

    Attributes
    ----------
    content_hash : str
        :func:`hash_volume` of the whole image volume.
    model : str
        Registry name of the model, e.g. ``"litemedsam"``.
    weights_hash : str
        SHA-256 (or a prefix) of the weights file; ``"random-seed0"`` for random test models.
    preprocess : str
        Canonical string of the preprocessing parameters, e.g. ``"ct:400/40|minmax|longest256"``.
    axis : int
        Slice axis of the volume.
    index : int
        Slice index along ``axis``.
    version : str
        napari-medsam version that computed the embedding.
    """

    content_hash: str
    model: str
    weights_hash: str
    preprocess: str
    axis: int
    index: int
    version: str = field(default=__version__)

    def __post_init__(self) -> None:
        # Normalise numpy integers and the like, so that digests and store attrs are plain JSON.
        for name in ("axis", "index"):
            object.__setattr__(self, name, operator.index(getattr(self, name)))
        for name in ("content_hash", "model", "weights_hash", "preprocess", "version"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"EmbeddingKey.{name} must be a str, got {type(value).__name__}")

    def volume_fields(self) -> dict[str, Any]:
        """The key fields that identify one on-disk store (all but ``index``)."""
        return {name: getattr(self, name) for name in _VOLUME_FIELDS}

    def volume_id(self) -> str:
        """Hex digest of every field except ``index``: the name of this volume's store folder."""
        return _hex_digest(self.volume_fields())

    def digest(self) -> str:
        """Hex digest of all fields."""
        return _hex_digest(asdict(self))


@dataclass(frozen=True)
class CacheStats:
    """Counters of an :class:`EmbeddingCache` (a snapshot)."""

    hits_ram: int = 0
    hits_disk: int = 0
    misses: int = 0
    ram_bytes_used: int = 0
    ram_entries: int = 0


def hash_volume(data: Any, *, axis: int = 0, chunk_slices: int = 16) -> str:
    """Fast content hash of a volume, reading at most ``chunk_slices`` slices at a time.

    Parameters
    ----------
    data : array-like
        ``np.ndarray``, ``np.memmap``, zarr array or any lazy proxy with ``shape``, ``dtype`` and
        ``__getitem__`` (slices), of any number of dimensions >= 1.
    axis : int
        Axis along which blocks are read. Use the default 0 unless the source is chunked along
        another axis. The digest covers shape, dtype, ``axis`` and the voxels of
        ``np.moveaxis(data, axis, 0)`` in C order, so it differs between axes: hash a volume with
        the same ``axis`` wherever the digests are compared.
    chunk_slices : int
        Slices per block; memory use is bounded by one block (plus a copy when the block is not
        C-contiguous).

    Returns
    -------
    str
        32 hex characters (BLAKE2b, 16-byte digest).
    """
    shape = tuple(int(s) for s in data.shape)
    if not shape:
        raise ValueError("hash_volume needs an array of at least one dimension, got a scalar")
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of shape {shape}")
    axis %= ndim
    if chunk_slices < 1:
        raise ValueError(f"chunk_slices must be >= 1, got {chunk_slices}")
    dtype = np.dtype(data.dtype)

    h = hashlib.blake2b(digest_size=16)
    h.update(repr((shape, dtype.str, axis)).encode("ascii"))
    lead = (slice(None),) * axis
    for start in range(0, shape[axis], chunk_slices):
        block = np.asarray(data[(*lead, slice(start, start + chunk_slices))])
        if axis:
            block = np.moveaxis(block, axis, 0)
        if block.dtype != dtype:  # a proxy that returns another dtype: hash the declared one
            block = block.astype(dtype)
        if not block.flags.c_contiguous:
            block = np.ascontiguousarray(block)
        h.update(block.data.cast("B"))
    return h.hexdigest()


class _Store:
    """An opened volume store: its zarr arrays and the lock that serialises access to them."""

    def __init__(self, path: Path, embeddings: Any, present: Any) -> None:
        self.path = path
        self.embeddings = embeddings
        self.present = present
        self.n_slices = int(embeddings.shape[0])
        self.emb_shape = tuple(int(s) for s in embeddings.shape[1:])
        # ``present`` uses the default "/" chunk key encoding, so slice i's flag is the file
        # present/c/<i>. Flags are only ever set to a checksum (never 0), and zarr stores no chunk
        # equal to the fill value 0, so "the flag file exists" == "the slice was written"; whether
        # it is intact is :meth:`read_verified`'s to tell. Listing files is ~100x faster than
        # decoding one chunk per slice, which is why ``cached_indices`` counts flags only.
        self.flags_dir = path / "present" / "c"
        self.lock = threading.Lock()

    def is_present(self, index: int) -> bool:
        return (self.flags_dir / str(index)).is_file()

    def read_verified(self, index: int) -> np.ndarray | None:
        """Slice ``index``'s embedding if its flag exists and its checksum matches, else None (lock held)."""
        if not self.is_present(index):
            return None
        try:
            expected = int(self.present[index])
            array = np.asarray(self.embeddings[index], dtype=_STORE_DTYPE)
        except Exception as e:  # noqa: BLE001 - a corrupt chunk raises whatever its codec raises
            _log.warning("Unreadable embedding chunk %d in %s (%s: %s); it is recomputed", index, self.path,
                         type(e).__name__, e)
            return None
        if expected != chunk_checksum(array, index):
            _log.warning("Embedding chunk %d in %s does not match its checksum (corrupt, missing or another "
                         "slice's); it is recomputed", index, self.path)
            return None
        return array

    def present_indices(self) -> set[int]:
        try:
            names = os.listdir(self.flags_dir)
        except FileNotFoundError:
            return set()
        # Skip zarr's temporary "<i>.<uuid>.partial" files of a write in progress.
        return {int(n) for n in names if n.isdigit() and int(n) < self.n_slices}


@dataclass
class _RamEntry:
    volume_id: str
    index: int
    array: np.ndarray


class EmbeddingCache:
    """RAM LRU over an fp16 zarr store on disk, one store per volume (see the module docstring).

    Parameters
    ----------
    cache_dir : path, optional
        Folder of the volume stores; default ``platformdirs.user_cache_path("napari-medsam") /
        "embeddings"``. Created on the first write.
    ram_bytes : int
        Budget of the RAM LRU in bytes (float16 arrays); 0 disables RAM caching. An entry larger
        than the budget is not kept in RAM.
    disk : bool
        False keeps embeddings in RAM only.

    Thread-safe: a worker thread may ``put`` while the GUI thread calls ``get``.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        ram_bytes: int = 512 * 2**20,
        disk: bool = True,
    ) -> None:
        if ram_bytes < 0:
            raise ValueError(f"ram_bytes must be >= 0, got {ram_bytes}")
        if cache_dir is None:
            import platformdirs

            cache_dir = platformdirs.user_cache_path("napari-medsam") / "embeddings"
        self.cache_dir = Path(cache_dir)
        self.ram_budget = int(ram_bytes)
        self.disk = bool(disk)
        self._lock = threading.RLock()
        self._ram: OrderedDict[str, _RamEntry] = OrderedDict()
        self._ram_used = 0
        self._stores: OrderedDict[str, _Store] = OrderedDict()
        self._hits_ram = 0
        self._hits_disk = 0
        self._misses = 0

    def __repr__(self) -> str:
        where = str(self.cache_dir) if self.disk else "RAM only"
        return f"EmbeddingCache({where!r}, ram_bytes={self.ram_budget})"

    # ------------------------------------------------------------------ public API

    def get(self, key: EmbeddingKey) -> np.ndarray | None:
        """The embedding of ``key`` (float16, read-only), from RAM or else disk; None on a miss.

        Raises
        ------
        CacheMismatchError
            If the store folder of this volume was written for other key fields.
        """
        digest = key.digest()
        with self._lock:
            entry = self._ram.get(digest)
            if entry is not None:
                self._ram.move_to_end(digest)
                self._hits_ram += 1
                return entry.array
        array = self._read_disk(key) if self.disk else None
        with self._lock:
            if array is None:
                self._misses += 1
                return None
            self._hits_disk += 1
            self._ram_put(digest, key, array)
        return array

    def put(self, key: EmbeddingKey, embedding: np.ndarray, *, n_slices: int) -> None:
        """Store ``embedding`` (cast to float16) for ``key``, in RAM and on disk.

        ``n_slices`` is the number of slices along ``key.axis`` (the length of the store).

        Raises
        ------
        CacheMismatchError
            If the volume's store holds embeddings of another shape or slice count, or was written
            for other key fields.
        ValueError
            If ``key.index`` is not in ``range(n_slices)``.
        """
        if not 0 <= key.index < n_slices:
            raise ValueError(f"slice index {key.index} is out of range for {n_slices} slices")
        array = np.array(embedding, dtype=_STORE_DTYPE, copy=True, order="C")
        array.flags.writeable = False
        if self.disk:
            store = self._store_for_write(key, array.shape, n_slices)
            with store.lock:
                # Same key, same embedding: a slice already present and verified is not rewritten;
                # a corrupt one is (a reader of a half-replaced chunk sees a checksum mismatch: a miss).
                if store.read_verified(key.index) is None:
                    store.embeddings[key.index] = array  # the chunk first ...
                    store.present[key.index] = chunk_checksum(array, key.index)  # ... then the flag
        with self._lock:
            self._ram_put(key.digest(), key, array)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached in RAM or on disk, verified (does not count as a hit or miss)."""
        if not isinstance(key, EmbeddingKey):
            return False
        with self._lock:
            if key.digest() in self._ram:
                return True
        if not self.disk:
            return False
        store = self._existing_store(key)
        if store is None or not 0 <= key.index < store.n_slices:
            return False
        with store.lock:
            return store.read_verified(key.index) is not None

    def cached_indices(self, key: EmbeddingKey) -> set[int]:
        """Slice indices of ``key``'s volume store that are in RAM or flagged on disk (``key.index`` is
        ignored). A quick count from the flags alone: a corrupt chunk is found when it is read."""
        volume_id = key.volume_id()
        with self._lock:
            indices = {e.index for e in self._ram.values() if e.volume_id == volume_id}
        if self.disk:
            store = self._existing_store(key)
            if store is not None:
                indices.update(store.present_indices())
        return indices

    @property
    def stats(self) -> CacheStats:
        """Hit/miss counters and RAM use."""
        with self._lock:
            return CacheStats(
                hits_ram=self._hits_ram,
                hits_disk=self._hits_disk,
                misses=self._misses,
                ram_bytes_used=self._ram_used,
                ram_entries=len(self._ram),
            )

    def clear_ram(self) -> None:
        """Drop every RAM entry (the disk stores stay)."""
        with self._lock:
            self._ram.clear()
            self._ram_used = 0

    def clear_disk(self) -> None:
        """Delete this cache_dir's volume stores (only folders this cache created; others stay)."""
        with self._lock:
            self._stores.clear()
            if not self.cache_dir.is_dir():
                return
            for child in self.cache_dir.iterdir():
                if not child.is_dir():
                    continue
                store = _VOLUME_ID_RE.match(child.name) and (child / "zarr.json").exists()
                if store or child.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------ RAM LRU

    def _ram_put(self, digest: str, key: EmbeddingKey, array: np.ndarray) -> None:
        """Insert or refresh an entry and evict the oldest ones until under budget (lock held)."""
        old = self._ram.pop(digest, None)
        if old is not None:
            self._ram_used -= old.array.nbytes
        if array.nbytes > self.ram_budget:
            return
        self._ram[digest] = _RamEntry(key.volume_id(), key.index, array)
        self._ram_used += array.nbytes
        while self._ram_used > self.ram_budget:
            _, evicted = self._ram.popitem(last=False)
            self._ram_used -= evicted.array.nbytes

    # ------------------------------------------------------------------ disk

    def _read_disk(self, key: EmbeddingKey) -> np.ndarray | None:
        store = self._existing_store(key)
        if store is None or not 0 <= key.index < store.n_slices:
            return None
        with store.lock:
            array = store.read_verified(key.index)
        if array is None:
            return None
        array.flags.writeable = False
        return array

    def _existing_store(self, key: EmbeddingKey) -> _Store | None:
        """The opened, verified store of ``key``'s volume; None if there is none on disk."""
        return self._open_store(key, create=None)

    def _store_for_write(self, key: EmbeddingKey, emb_shape: tuple[int, ...], n_slices: int) -> _Store:
        """The store of ``key``'s volume, created if missing; its emb_shape and n_slices are checked."""
        store = self._open_store(key, create=(emb_shape, n_slices))
        if store is None:  # pragma: no cover - _open_store always creates when asked to
            raise RuntimeError(f"embedding store for {key.volume_id()} was not created")
        differing = []
        if tuple(emb_shape) != store.emb_shape:
            differing.append(f"emb_shape: store {store.emb_shape}, new {tuple(emb_shape)}")
        if n_slices != store.n_slices:
            differing.append(f"n_slices: store {store.n_slices}, new {n_slices}")
        if differing:
            raise _mismatch(store.path, differing)
        return store

    def _open_store(self, key: EmbeddingKey, create: tuple[tuple[int, ...], int] | None) -> _Store | None:
        volume_id = key.volume_id()
        with self._lock:
            store = self._stores.get(volume_id)
            if store is not None:
                self._stores.move_to_end(volume_id)
                return store
            path = self.cache_dir / volume_id
            if (path / "zarr.json").exists() and _store_format(path) in _OLD_FORMATS:
                _discard(path)  # ours, from an older version without checksums: rebuilt
            if not (path / "zarr.json").exists():
                if create is None:
                    return None
                self._create_store(path, key, *create)
            store = self._load_store(path, key)
            self._stores[volume_id] = store
            while len(self._stores) > _MAX_OPEN_STORES:
                self._stores.popitem(last=False)
            return store

    def _create_store(self, path: Path, key: EmbeddingKey, emb_shape: tuple[int, ...], n_slices: int) -> None:
        """Build a complete store in a temporary folder and rename it to ``path``.

        If another process created ``path`` meanwhile, its store is kept (and verified on load).
        """
        import zarr

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex}"
        attrs: dict[str, Any] = {
            "format": STORE_FORMAT,
            **key.volume_fields(),
            "emb_shape": list(emb_shape),
            "n_slices": int(n_slices),
        }
        try:
            group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=attrs)
            group.create_array(
                "embeddings",
                shape=(n_slices, *emb_shape),
                chunks=(1, *emb_shape),
                dtype=_STORE_DTYPE,
                fill_value=0,
            )
            group.create_array(
                "present",
                shape=(n_slices,),
                chunks=(1,),
                dtype=np.uint64,
                fill_value=0,
                chunk_key_encoding={"name": "default", "separator": "/"},
            )
            try:
                os.rename(tmp, path)
            except OSError:
                if not (path / "zarr.json").exists():
                    raise
                # Another process won the race; its store is used instead.
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _load_store(self, path: Path, key: EmbeddingKey) -> _Store:
        """Open the store at ``path`` and verify that its attrs match ``key`` (lock held)."""
        import zarr

        try:
            group = zarr.open_group(str(path), mode="r+")
            attrs = dict(group.attrs)
            embeddings = group["embeddings"]
            present = group["present"]
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise CacheMismatchError(
                f"The embedding cache folder {path} cannot be read as a napari-medsam store ({e}). "
                "Delete that folder or use another --cache-dir."
            ) from e
        expected: dict[str, Any] = {"format": STORE_FORMAT, **key.volume_fields()}
        differing = [
            f"{name}: store {attrs.get(name)!r}, expected {value!r}"
            for name, value in expected.items()
            if attrs.get(name) != value
        ]
        emb_shape = tuple(int(s) for s in embeddings.shape[1:])
        n_slices = int(embeddings.shape[0])
        if attrs.get("emb_shape") != list(emb_shape):
            differing.append(f"emb_shape: attrs {attrs.get('emb_shape')!r}, array {list(emb_shape)!r}")
        if attrs.get("n_slices") != n_slices:
            differing.append(f"n_slices: attrs {attrs.get('n_slices')!r}, array {n_slices!r}")
        if tuple(present.shape) != (n_slices,):
            differing.append(f"present: shape {tuple(present.shape)}, expected {(n_slices,)}")
        if present.metadata.chunk_key_encoding.encode_chunk_key((3,)) != "c/3":
            differing.append("present: chunk key encoding is not the default '/' one")
        if np.dtype(present.dtype) != np.uint64:
            differing.append(f"present dtype: {present.dtype}, expected uint64 checksums")
        if np.dtype(embeddings.dtype) != _STORE_DTYPE:
            differing.append(f"embeddings dtype: {embeddings.dtype}, expected float16")
        if differing:
            raise _mismatch(path, differing)
        return _Store(path, embeddings, present)


def _store_format(path: Path) -> Any:
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def _discard(path: Path) -> None:
    """Move a store of ours aside (atomically) and delete it."""
    aside = path.with_name(f"{_TMP_PREFIX}{path.name}-old-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _mismatch(path: Path, differing: list[str]) -> CacheMismatchError:
    return CacheMismatchError(
        f"The embedding cache folder {path} was written for other inputs; differing fields: "
        + "; ".join(differing)
        + ". Its embeddings cannot be reused. Delete that folder or use another --cache-dir."
    )
