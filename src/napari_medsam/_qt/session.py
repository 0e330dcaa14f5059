"""What the plugin's dock widgets share for one viewer: the model, the cache and the encoders.

GUI-free: psygnal signals, no Qt, no napari, no torch at import. The long steps are generators
(``*_steps``) that run in a thread worker through :mod:`napari_medsam._qt._workers`; they receive
snapshots taken on the main thread (:class:`EncoderRequest`: an :class:`~napari_medsam.io.ImageVolume`,
the slice axis and the intensity choice), never a layer or the viewer.

Embeddings never mix between images: each request names the layer object and the identity of its
data array, and the :class:`~napari_medsam.core.encoder.VolumeEncoder` behind it keys every slice
by the volume's content hash, the model, its weights and the preprocessing.

There is one :class:`Session` per viewer (:func:`session_for`), not one per process: two viewers,
or two tests, never share a model or an encoder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psygnal import Signal

from ..core.progress import Progress, ProgressGen, drain
from ..core.registry import DEFAULT_MODEL

__all__ = ["EncoderRequest", "IntensityChoice", "ModelChoice", "Session", "avoid_triton_llvm_clash", "session_for"]

_log = logging.getLogger(__name__)


def avoid_triton_llvm_clash() -> bool:
    """Keep torch from importing triton into a process where Mesa's LLVM is already loaded.

    napari's OpenGL canvas on Mesa drivers (llvmpipe under Xvfb, radeonsi, ...) maps
    ``libLLVM-*.so``; triton's ``libtriton.so`` carries its own LLVM, and importing it afterwards
    crashes the process (segmentation fault). torch imports triton lazily the first time an
    optimiser is built (``torch._dynamo``), i.e. when a head is trained. Eager CPU and GPU code needs
    no triton, so when the clash is certain (Linux, LLVM mapped, triton installed but not imported)
    ``import triton`` is made to fail cleanly instead. Returns True when it did so.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps") as f:
            mapped = "libLLVM" in f.read()
    except OSError:
        return False
    if not mapped:
        return False
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` raises ImportError
    _log.info("Mesa's LLVM is loaded: torch will run without triton (importing it would crash)")
    return True


@contextlib.contextmanager
def worker_threads(*, background_busy: bool = False) -> Iterator[None]:
    """On 4 cores or more, run torch on all cores but one in this (worker) thread, leaving one to
    the GUI thread. With 2 cores it changes nothing: halving the encoder's threads cost 40 % of its
    speed there (benchmarks/bench_gui.py) while the window stayed as responsive either way.
    ``background_busy``: another job (training, propagation) holds the cores: an interactive
    decode then takes the one core it left (:func:`napari_medsam.core.speed.interactive_threads`).

    With PyTorch's OpenMP backend the count is per calling thread; it is restored on exit.
    """
    import torch

    from ..core.speed import interactive_threads

    prev = torch.get_num_threads()
    cores = os.cpu_count() or 2
    want = prev if cores < 4 else max(1, min(prev, cores - 1))
    want = interactive_threads(want, background_busy=background_busy)
    if want != prev:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if want != prev:
            torch.set_num_threads(prev)


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load and how (the Model widget's parameters)."""

    name: str = DEFAULT_MODEL
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"


@dataclass(frozen=True)
class IntensityChoice:
    """How raw intensities map to the model's 0-255 input: ``auto``, ``ct`` (with a ``window``
    preset such as ``soft_tissue``), ``mr``, ``minmax`` or ``none``."""

    mode: str = "auto"
    window: str | None = None


@dataclass(frozen=True, eq=False)
class EncoderRequest:
    """A main-thread snapshot of what to embed: one image layer's volume along one axis."""

    image_id: int            # id() of the Image layer
    data_id: int             # id() of its data array: replacing the data gives a new encoder
    volume: Any              # ImageVolume (shares the layer's array, no copy)
    axis: int
    intensity: IntensityChoice = IntensityChoice()
    name: str = ""

    @property
    def key(self) -> tuple:
        return (self.image_id, self.data_id, self.axis, self.intensity)


def default_cache_dir() -> Path | None:
    """``$NAPARI_MEDSAM_CACHE/embeddings`` when that is set (as for the CLI), else the user cache."""
    env = os.environ.get("NAPARI_MEDSAM_CACHE")
    return Path(env).expanduser() / "embeddings" if env else None


class Session:
    """The loaded model, the embedding cache and the encoders of one viewer.

    Signals (emitted on the thread that calls the method; widgets call them on the main thread):
    ``model_changed(loaded_or_None)``, ``embeddings_changed(image_id)``, ``busy_changed(cpu_jobs)``.

    ``cpu_jobs`` counts the running jobs that want every core (propagation, whole-image embedding,
    training, prediction; see :meth:`hold_cpu`); background prefetching waits while it is not 0.
    """

    model_changed = Signal(object)
    embeddings_changed = Signal(object)
    busy_changed = Signal(int)

    def __init__(self, *, cache_dir: str | os.PathLike | None = None, disk_cache: bool = True) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.disk_cache = disk_cache
        self.loaded: Any = None
        self.model_choice: ModelChoice | None = None
        self.intensity = IntensityChoice()
        self.class_names: dict[int, str] = {}  # label id -> class name, from the Annotate widget
        self.napari_progress = False  # also show long jobs in napari's activity panel (see _workers)
        self._cache: Any = None
        self._encoders: dict[tuple, Any] = {}
        self._lock = threading.RLock()
        self.cpu_jobs = 0

    # -- jobs that need the CPU (main thread) -----------------------------------------------------------
    def hold_cpu(self, job: Any) -> Any:
        """Count ``job`` (a running :class:`~napari_medsam._qt._workers.Job`) in :attr:`cpu_jobs`
        until it finishes; returns it. A finished job (or None) is returned as it is."""
        if job is None or job.done:
            return job
        self.cpu_jobs += 1
        self.busy_changed.emit(self.cpu_jobs)
        job.add_done_callback(self._release_cpu)
        return job

    def _release_cpu(self, _job: Any = None) -> None:
        self.cpu_jobs = max(0, self.cpu_jobs - 1)
        self.busy_changed.emit(self.cpu_jobs)

    # -- model --------------------------------------------------------------------------------------
    def load_model_steps(self, choice: ModelChoice) -> ProgressGen[Any]:
        """Load a model (worker thread). Yields download progress when weights must be fetched."""
        from ..core.build import load_model
        from ..core.registry import get_spec
        from ..core.weights import weights_available

        spec = get_spec(choice.name)
        yield Progress(0, 0, f"loading {spec.name}")
        avoid_triton_llvm_clash()
        import torch

        from ..core.speed import configure_runtime

        configure_runtime(threads=torch.get_num_threads())  # allocator policy only; threads: worker_threads()
        kwargs = {"weights": choice.weights, "device": choice.device, "precision": choice.precision}
        if choice.weights is None and not spec.weights.random_init and weights_available(spec) is None:
            loaded = yield from _steps_from_callback(load_model, spec.name, **kwargs)
        else:
            loaded = load_model(spec.name, **kwargs)
        yield Progress(0, 0, f"warming up {spec.name}")
        with worker_threads():
            self._warm_up(loaded)
        yield Progress(1, 1, f"{spec.name} loaded")
        return loaded

    def _warm_up(self, loaded: Any) -> None:
        """Import what embedding and decoding need and run both once (worker thread).

        Importing C extensions (zarr's codecs) and torch's first kernels hold the GIL for hundreds
        of milliseconds; done here, while the user waits for Load anyway, they do not stall the
        window later during embedding or the first prompt.
        """
        import numpy as np

        from ..core.encoder import run_encoder
        from ..core.preprocess import SliceTransform
        from ..core.segment import Prompt2D, decode

        if self.disk_cache:
            import zarr  # noqa: F401 - imported for its side effect of loading codecs now
        s = loaded.spec.input_size
        emb = run_encoder(loaded, np.zeros((1, 3, s, s), np.float32))
        tf = SliceTransform.for_model((s, s), loaded.spec)
        decode(loaded, emb, tf, [Prompt2D.from_box((1.0, 1.0, s / 2, s / 2))])

    def set_model(self, loaded: Any, choice: ModelChoice | None = None) -> None:
        """Use ``loaded`` from now on (main thread); encoders of the previous model are dropped."""
        with self._lock:
            self.loaded = loaded
            self.model_choice = choice
            self._encoders.clear()
        self.model_changed.emit(loaded)

    @property
    def cache(self) -> Any:
        with self._lock:
            if self._cache is None:
                from ..core.embeddings import EmbeddingCache

                self._cache = EmbeddingCache(self.cache_dir, disk=self.disk_cache)
            return self._cache

    # -- encoders -----------------------------------------------------------------------------------
    def encoder(self, req: EncoderRequest) -> Any:
        """The encoder for ``req``, built on first use (worker thread: it samples intensities and
        hashes the volume). Raises :class:`~napari_medsam.core.errors.MedSamError` without a model."""
        from ..core.encoder import VolumeEncoder
        from ..core.errors import MedSamError
        from ..core.preprocess import compute_intensity

        with self._lock:
            loaded = self.loaded
            enc = self._encoders.get(req.key)
            if enc is not None and enc.loaded is loaded:
                return enc
        if loaded is None:
            raise MedSamError("no model is loaded: choose one in the MedSAM Model widget and press Load")
        vol = req.volume
        intensity = compute_intensity(vol.data, req.intensity.mode, window=req.intensity.window,
                                      axis=req.axis, rgb=vol.rgb)
        enc = VolumeEncoder(loaded, vol, axis=req.axis, intensity=intensity, cache=self.cache)
        _ = enc.content_hash  # hash here, in the worker, never on the main thread
        with self._lock:
            if self.loaded is not loaded:  # the model changed meanwhile: do not keep a stale encoder
                return enc
            return self._encoders.setdefault(req.key, enc)

    def peek_encoder(self, req: EncoderRequest | None) -> Any:
        """The encoder for ``req`` if it has been built (cheap, main thread), else None."""
        if req is None:
            return None
        with self._lock:
            enc = self._encoders.get(req.key)
            return enc if enc is not None and enc.loaded is self.loaded else None

    def forget_image(self, image_id: int) -> None:
        """Drop the encoders of a removed layer (its embeddings stay in the cache)."""
        with self._lock:
            for key in [k for k in self._encoders if k[0] == image_id]:
                del self._encoders[key]

    # -- long work (worker thread) ----------------------------------------------------------------------
    def embed_steps(self, req: EncoderRequest, current: Callable[[], int] | None = None, *,
                    cancel: threading.Event | None = None) -> ProgressGen[dict]:
        """Embed every slice of ``req``, nearest the slice under view first.

        ``current()`` returns the slice under view; it is read again before every batch, so moving
        through the volume while it embeds moves the work there.
        """
        yield Progress(0, 0, "preparing")
        with worker_threads():
            return (yield from self._embed(req, current, cancel))

    def _embed(self, req: EncoderRequest, current: Callable[[], int] | None,
               cancel: threading.Event | None) -> ProgressGen[dict]:
        enc = self.encoder(req)
        n = enc.n_slices
        todo = set(range(n)) - enc.cached_indices()
        done = n - len(todo)
        t0 = time.perf_counter()
        computed = 0
        yield Progress(done, n, "embedding", {"cached": done, "image_id": req.image_id})
        # One slice at a time on a CPU: a prompt on a slice not embedded yet waits for the encoder
        # while a batch runs, and the slice under view is re-read sooner. GPUs batch.
        step = 1 if getattr(enc.loaded.device, "type", "cpu") == "cpu" else enc.batch_size
        while todo:
            c = current() if current is not None else 0
            c = min(max(int(c), 0), n - 1)
            batch = sorted(todo, key=lambda i: (abs(i - c), i))[:step]
            summary = drain(enc.embed(batch, cancel=cancel))
            computed += summary["computed"]
            todo.difference_update(batch)
            done += len(batch)
            yield Progress(done, n, "embedding", {"cached": done, "slice": batch[0], "image_id": req.image_id})
        return {"computed": computed, "cached": n - computed, "n_slices": n,
                "seconds": time.perf_counter() - t0, "image_id": req.image_id}

    def encoder_steps(self, req: EncoderRequest) -> ProgressGen[Any]:
        """Build (or find) the encoder of ``req`` and return it (worker thread: hashes the volume)."""
        yield Progress(0, 0, "preparing the encoder")
        return self.encoder(req)

    def status_steps(self, req: EncoderRequest) -> ProgressGen[dict]:
        """How many slices of ``req`` are cached (worker thread: opens the disk store)."""
        yield Progress(0, 0, "checking cache")
        enc = self.encoder(req)
        return {"cached": len(enc.cached_indices()), "n_slices": enc.n_slices, "image_id": req.image_id}

    def preview_steps(self, req: EncoderRequest, index: int, prompt: Any) -> ProgressGen[Any]:
        """One prompt -> one :class:`~napari_medsam.core.segment.MaskResult` on slice ``index``."""
        from ..core.segment import segment_slice

        yield Progress(0, 1, "segmenting")
        t0 = time.perf_counter()
        with worker_threads(background_busy=self.cpu_jobs > 0):
            enc = self.encoder(req)
            cached = enc.is_cached(index)
            res = segment_slice(enc, index, [prompt])[0]
        yield Progress(1, 1, "segmented", {"embedded_now": not cached, "seconds": time.perf_counter() - t0})
        return res

    def propagate_steps(self, req: EncoderRequest, seeds: dict[int, Any], params: Any = None, *,
                        cancel: threading.Event | None = None) -> ProgressGen[dict]:
        """Propagate one object from ``seeds`` ({slice: Prompt2D}) through the volume."""
        from ..core.segment import PropagationParams, propagate

        yield Progress(0, 0, "preparing")
        with worker_threads():
            enc = self.encoder(req)
            masks = yield from propagate(enc, seeds, params=params or PropagationParams(), cancel=cancel)
        return masks


def _steps_from_callback(fn: Callable[..., Any], *args: Any, poll: float = 0.1, **kwargs: Any) -> ProgressGen[Any]:
    """Run ``fn(*args, progress=cb, **kwargs)`` (a byte-count callback API such as ``load_model``)
    and yield its callbacks as :class:`Progress` until it returns."""
    events: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, progress=lambda done, total: events.put((done, total)), **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the generator's thread
            box["error"] = e
        finally:
            events.put(None)

    thread = threading.Thread(target=target, name="napari-medsam-download", daemon=True)
    thread.start()
    while True:
        try:
            item = events.get(timeout=poll)
        except queue.Empty:
            continue
        if item is None:
            break
        done, total = item
        yield Progress(int(done), int(total), "downloading weights", {"bytes": int(done)})
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session_for(viewer: Any) -> Session:
    """The :class:`Session` of ``viewer``, created on first use and dropped with the viewer."""
    session = _SESSIONS.get(viewer)
    if session is None:
        session = _SESSIONS[viewer] = Session()
    return session
