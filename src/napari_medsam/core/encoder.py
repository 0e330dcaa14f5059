"""Embedding the slices of a volume through the cache: the one place the image encoder runs.

:class:`VolumeEncoder` binds a loaded model to one image volume, one slice axis and one intensity
mapping. Every embedding it hands out is looked up in (or written to) the
:class:`~napari_medsam.core.embeddings.EmbeddingCache` under a key that names all of those, so
switching images, axes, windows or models never mixes embeddings.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from .embeddings import EmbeddingCache, EmbeddingKey, hash_volume
from .errors import Cancelled, InvalidImageError
from .loaded import LoadedModel
from .preprocess import Intensity, SliceTransform, compute_intensity, preprocess_key, to_model_input
from .progress import Progress, ProgressGen


def as_volume(image: Any) -> Any:
    """An :class:`~napari_medsam.core.volume.ImageVolume` for an ImageVolume or a plain array."""
    from .volume import ImageVolume

    return image if isinstance(image, ImageVolume) else ImageVolume.from_array(np.asarray(image))


_CHECKPOINT = threading.local()  # .fn: what this thread's encoder call runs between blocks
_INSTALL_LOCK = threading.Lock()


def _between_blocks(_module: Any, _args: Any) -> None:
    fn = getattr(_CHECKPOINT, "fn", None)
    if fn is not None:
        fn()


def install_checkpoints(encoder: Any) -> int:
    """Make every block of ``encoder`` (each element of its ``nn.ModuleList``s: TinyViT's stages and
    their blocks, a ViT's blocks) and each part of a block that holds weights (its attention, MLP,
    convolutions) call the running thread's checkpoint before it runs (see
    :func:`encoder_checkpoint`); idempotent, returns the number of modules hooked (0: already done).

    The hooks are the same for every thread and do nothing on a thread that set no checkpoint (a
    thread-local read per block, well under a microsecond against blocks of tens of milliseconds)."""
    from torch import nn

    with _INSTALL_LOCK:
        if getattr(encoder, "_medsam_checkpoints", False):
            return 0
        n = 0
        for m in encoder.modules():
            if isinstance(m, nn.ModuleList):
                for block in m:
                    # the block, and the parts of it (attention, MLP, convs): a paused call waits
                    # at most one part (LiteMedSAM bf16: longest stretch 56-97 ms by blocks alone)
                    for part in (block, *(c for c in block.children() if not isinstance(c, nn.ModuleList)
                                          and any(True for _ in c.parameters()))):
                        part.register_forward_pre_hook(_between_blocks)
                        n += 1
        encoder._medsam_checkpoints = True
        return n


@contextlib.contextmanager
def encoder_checkpoint(loaded: LoadedModel, checkpoint: Callable[[], None] | None) -> Iterator[None]:
    """Inside this block, encoder calls of this thread (:func:`run_encoder`) run ``checkpoint()``
    before every block of ``loaded``'s encoder and every part of a block (LiteMedSAM: 49
    checkpoints a slice; on 2 AVX512-BF16 cores the longest stretch between two was 27 ms of a
    341 ms bf16 pass, against 56-97 ms with the 16 block boundaries alone): it may wait (a
    background call giving the cores and the encoder to a foreground request) or raise to abandon
    the call. None: no checkpoint."""
    if checkpoint is not None:
        install_checkpoints(loaded.model.image_encoder)
    prev = getattr(_CHECKPOINT, "fn", None)
    _CHECKPOINT.fn = checkpoint
    try:
        yield
    finally:
        _CHECKPOINT.fn = prev


def run_encoder(loaded: LoadedModel, batch: np.ndarray) -> Any:
    """``(B, 3, S, S)`` float32 inputs -> ``(B, C, h, w)`` float32 embeddings (torch, on the model's device)."""
    import torch

    from .device import autocast
    from .speed import encoder_call_size

    x = torch.from_numpy(batch).to(loaded.device)
    step = encoder_call_size(loaded, x.shape[0])  # CPU: one slice per call (see core.speed)
    with torch.inference_mode(), autocast(loaded.device, loaded.dtype):
        outs = [loaded.model.image_encoder(x[i:i + step]) for i in range(0, x.shape[0], step)]
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).float()


class _Abandon(Exception):  # noqa: N818 - internal control flow, never leaves this module
    """A yielding encoder call found its slices embedded by the foreground meanwhile."""


class VolumeEncoder:
    """Embeddings of one volume's slices along one axis for one model, through the cache.

    For a 2D image (grey or RGB) there is a single slice, index 0, whatever ``axis`` says.
    Thread-safe: a worker may embed while the GUI thread asks for the slice under view.

    One encoder call runs at a time (a lock). A background call (:meth:`embed` with ``yield_to``,
    the prefetcher's) gives way between two blocks of the network while ``yield_to()`` is true: it
    releases the lock and waits, so a foreground :meth:`get` of another slice starts within one
    block instead of after the whole slice, and a decode on a cached slice has the cores to itself.
    A foreground :meth:`get` of the very slice the paused call holds embeds it itself, at the
    caller's priority, and the background call then drops it: the prefetcher runs at nice 19, so
    letting it finish the slice (as it did before) waited on a starved thread whenever the GUI
    thread painted (box on a slice not yet embedded: p95 1131 ms against one 569 ms pass, quiet,
    benchmarks/bench_gui.py).
    """

    def __init__(self, loaded: LoadedModel, image: Any, *, axis: int = 0, intensity: Intensity | None = None,
                 cache: EmbeddingCache | None = None, batch_size: int = 4,
                 content_hash: str | None = None) -> None:
        self.loaded = loaded
        self.volume = as_volume(image)
        spatial = self.volume.ndim - (1 if self.volume.rgb else 0)
        if spatial not in (2, 3):
            raise InvalidImageError(
                f"expected a 2D image or a 3D volume, got {spatial} spatial dimensions (shape {self.volume.shape})"
            )
        self.is_3d = spatial == 3
        if self.is_3d and not -3 <= axis < 3:
            raise InvalidImageError(f"--axis must be 0, 1 or 2 for a 3D volume, got {axis}")
        self.axis = axis % 3 if self.is_3d else 0
        self.intensity = intensity or compute_intensity(self.volume.data, axis=self.axis, rgb=self.volume.rgb)
        self.cache = cache if cache is not None else EmbeddingCache(disk=False)
        self.batch_size = max(1, int(batch_size))
        self._content_hash = content_hash
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._prep = preprocess_key(self.intensity, loaded.spec)
        self._last: tuple[EmbeddingKey, Any] | None = None
        # slices computed whose cache write (RAM and disk, 20-200 ms) is still going on: written
        # outside the encoder lock, so a foreground call never waits for another call's disk write
        self._fresh: dict[int, np.ndarray] = {}
        self._unstored: set[int] = set()  # ... of which these wait for flush() (get(store=False))
        self._windows: dict[tuple[int, tuple[int, ...]], tuple[Any, SliceTransform]] = {}  # embed_window's
        #: seconds of the encoder forward of the last slice :meth:`get` computed (the pass alone: no
        #: wait for the lock, no cache write); None until one was
        self.last_pass_s: float | None = None

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def n_slices(self) -> int:
        return self.volume.n_slices(self.axis) if self.is_3d else 1

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.volume.slice_shape(self.axis)

    def transform(self) -> SliceTransform:
        return SliceTransform.for_model(self.slice_shape, self.loaded.spec)

    def raw_slice(self, index: int) -> np.ndarray:
        self._check_index(index)
        return np.asarray(self.volume.slice(self.axis, index) if self.is_3d else self.volume.data[...])

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.n_slices:
            raise InvalidImageError(f"slice {index} is outside 0..{self.n_slices - 1} along axis {self.axis}")

    # -- keys ---------------------------------------------------------------------------------------
    @property
    def content_hash(self) -> str:
        h = self._content_hash
        if h is not None:  # no lock once known: a key() must never wait for a running encoder call
            return h
        with self._lock:
            if self._content_hash is None:
                self._content_hash = hash_volume(self.volume.data)
            return self._content_hash

    def key(self, index: int) -> EmbeddingKey:
        return EmbeddingKey(content_hash=self.content_hash, model=self.loaded.name,
                            weights_hash=self.loaded.compute_id, preprocess=self._prep,
                            axis=self.axis, index=int(index))

    @property
    def hash_known(self) -> bool:
        """The volume's content hash is computed (keys are then free: no hashing)."""
        return self._content_hash is not None

    def is_cached(self, index: int) -> bool:
        return int(index) in self._fresh or self.key(index) in self.cache

    def cached_indices(self) -> set[int]:
        return self.cache.cached_indices(self.key(0)) | set(self._fresh)

    def _cached(self, index: int, key: EmbeddingKey) -> np.ndarray | None:
        emb = self._fresh.get(index)
        return emb if emb is not None else self.cache.get(key)

    def _store(self, items: list[tuple[int, np.ndarray]]) -> None:
        """Write computed slices to the cache (outside the encoder lock); they are served from
        :attr:`_fresh` meanwhile."""
        try:
            for i, emb in items:
                self.cache.put(self.key(i), emb, n_slices=self.n_slices)
        finally:
            for i, _ in items:
                self._fresh.pop(i, None)

    # -- computing ----------------------------------------------------------------------------------
    def model_input(self, index: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Slice ``index`` (or its part ``window = (r0, c0, r1, c1)``) as the model's ``(3, S, S)``
        input, through the volume's intensity mapping."""
        raw = self.raw_slice(index)
        if window is not None:
            r0, c0, r1, c1 = (int(v) for v in window)
            raw = raw[r0:r1, c0:c1]
        x, _ = to_model_input(self.intensity.apply(raw), self.loaded.spec)
        return x

    def encoder_input(self, index: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """What the image encoder takes for slice ``index`` (or its part ``window``): :meth:`model_input`
        ``(3, S, S)``, or for a depth-aware (SD-Trans) encoder with ``slice_context = k`` the stack
        ``(2k+1, 3, S, S)`` of the slice and its neighbours (repeated at the volume's ends), see
        :mod:`~napari_medsam.core.adapt`."""
        k = int(getattr(self.loaded.model.image_encoder, "slice_context", 0) or 0)
        if k <= 0:
            return self.model_input(index, window)
        last = self.n_slices - 1
        return np.stack([self.model_input(min(max(index + o, 0), last), window) for o in range(-k, k + 1)])

    def has_window(self, index: int, window: tuple[int, int, int, int]) -> bool:
        """The embedding of ``window`` of slice ``index`` is remembered: :meth:`embed_window` returns
        it without an encoder call."""
        return (int(index), tuple(int(v) for v in window)) in self._windows

    def embed_window(self, index: int, window: tuple[int, int, int, int]) -> tuple[Any, SliceTransform]:
        """The embedding ``(1, C, h, w)`` of the part ``window = (r0, c0, r1, c1)`` (inside the slice)
        of slice ``index`` (:meth:`encoder_input`) and the window's own :class:`SliceTransform`,
        computed now (one encoder call, under the encoder lock like any foreground call) and not
        cached: windows follow a box, they are not a slice's identity. The last few are remembered
        (a preview and the propagation that follows from the same box reuse them)."""
        import torch

        key = (int(index), tuple(int(v) for v in window))
        hit = self._windows.get(key)
        if hit is not None:
            return hit
        r0, c0, r1, c1 = key[1]
        tf = SliceTransform.for_model((r1 - r0, c1 - c0), self.loaded.spec)
        x = self.encoder_input(index, window)
        with self._lock:
            out = run_encoder(self.loaded, x[None]).contiguous(memory_format=torch.channels_last)
        self._windows[key] = (out, tf)
        while len(self._windows) > 8:
            self._windows.pop(next(iter(self._windows)))
        return out, tf

    def get(self, index: int, *, store: bool = True) -> Any:
        """The embedding of slice ``index`` as a ``(1, C, h, w)`` float32 tensor on the model's device.

        ``store=False``: a slice computed now is kept in memory and served from there, its cache
        write left to :meth:`flush` (a prompt's slice: the caller shows the mask first).

        Laid out channels-last (``torch.channels_last``), the layout the decoder reads. The last
        slice asked for is kept (one slice, a few MB): repeated prompts on the slice under view
        skip the cache read and the float16 conversion. Treat the tensor as read-only.
        """
        import torch

        key = self.key(index)
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        emb = self._cached(int(index), key)
        if emb is None:
            emb = self._embed_foreground(int(index), key, store=store)
        hwc = np.empty(emb.shape[1:] + emb.shape[:1], np.float32)  # (h, w, C): one converting transpose
        np.copyto(hwc, np.moveaxis(np.asarray(emb), 0, -1))
        out = torch.from_numpy(hwc).permute(2, 0, 1)[None].to(self.loaded.device)
        self._last = (key, out)
        return out

    def _embed_foreground(self, index: int, key: EmbeddingKey, *, store: bool = True) -> np.ndarray:
        with self._lock:  # a yielding background call releases it between blocks
            emb = self._cached(index, key)
            if emb is not None:
                return emb
            t0 = time.perf_counter()
            out = run_encoder(self.loaded, self.encoder_input(index)[None])
            emb = out[0].cpu().numpy().astype(np.float16)
            self.last_pass_s = time.perf_counter() - t0
            self._fresh[index] = emb
            if not store:
                self._unstored.add(index)
        if store:
            self._store([(index, emb)])
        return emb

    def flush(self, indices: Iterable[int] | None = None) -> None:
        """Write the slices :meth:`get` computed with ``store=False`` (these, or all) to the cache."""
        todo = set(self._unstored) if indices is None else {int(i) for i in indices} & self._unstored
        self._unstored -= todo
        items = [(i, self._fresh[i]) for i in sorted(todo) if i in self._fresh]
        if items:
            self._store(items)

    def _checkpoint(self, chunk: list[int], cancel: threading.Event | None,
                    yield_to: Callable[[], bool] | None) -> Callable[[], None]:
        """What a background call runs between two encoder blocks (the lock is held there)."""
        def stop_if_cancelled() -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("embedding stopped; embedded slices stay cached")

        def check() -> None:
            stop_if_cancelled()
            if yield_to is None or not yield_to():
                return
            while yield_to():
                self._cond.wait(0.01)  # releases the lock: a foreground get() may embed meanwhile
                stop_if_cancelled()
            if all(self.is_cached(i) for i in chunk):
                raise _Abandon

        return check

    def embed(self, indices: Iterable[int] | None = None, *, cancel: threading.Event | None = None,
              yield_to: Callable[[], bool] | None = None) -> ProgressGen[dict]:
        """Embed slices (all by default) that are not cached yet, in batches; yield progress.

        Returns a summary ``{"computed": n, "cached": m, "seconds": t}``. Stops between batches
        when ``cancel`` is set (raising :class:`Cancelled`) or when the consumer closes the generator;
        with ``yield_to`` also between the encoder's blocks. ``yield_to()``: while true, the call
        pauses between two blocks and lets foreground requests use the encoder (see the class).
        """
        order = list(range(self.n_slices)) if indices is None else [int(i) for i in indices]
        for i in order:
            self._check_index(i)
        todo = [i for i in order if not self.is_cached(i)]
        total = len(order)
        done = total - len(todo)
        t0 = time.perf_counter()
        yield Progress(done, total, "embedding", {"cached": done})
        for start in range(0, len(todo), self.batch_size):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"embedding stopped after {done} of {total} slices; embedded slices stay cached")
            chunk = todo[start:start + self.batch_size]
            with self._lock:
                chunk = [i for i in chunk if not self.is_cached(i)]
                if chunk:
                    batch = np.stack([self.encoder_input(i) for i in chunk])
                    check = self._checkpoint(chunk, cancel, yield_to) if yield_to is not None else None
                    try:
                        with encoder_checkpoint(self.loaded, check):
                            out = run_encoder(self.loaded, batch).cpu().numpy().astype(np.float16)
                    except _Abandon:
                        out = None  # the foreground embedded them meanwhile
                    if out is not None:
                        self._fresh.update(zip(chunk, out, strict=True))
                    self._cond.notify_all()
            if chunk and out is not None:
                self._store(list(zip(chunk, out, strict=True)))
            done += len(todo[start:start + self.batch_size])
            yield Progress(done, total, "embedding", {"slice": chunk[-1] if chunk else None})
        return {"computed": len(todo), "cached": total - len(todo), "seconds": time.perf_counter() - t0}
