"""The annotation session: the state and verbs that the widgets, the CLI and scripts all drive.

GUI-free: psygnal signals, no Qt, no napari, no torch at import. An :class:`AnnotationSession`
owns the loaded model, the embedding cache and the encoders, the classes, the user's labels, the
prompt bookkeeping (the undo log and the committed slices that seed propagation), the trained head,
the count of running jobs that want the CPU, and optionally one image of its own (a script or a
test works on that; the widgets pass each image layer's snapshot as an :class:`EncoderRequest`).

Long verbs are generators (``*_steps``) that yield :class:`~napari_medsam.core.progress.Progress`
and return their result, stoppable through a ``threading.Event``; the widgets run them in thread
workers (:mod:`napari_medsam._qt._workers`), a script drains them with the plain verbs
(:meth:`~AnnotationSession.load_model`, :meth:`~AnnotationSession.preview`,
:meth:`~AnnotationSession.commit`, :meth:`~AnnotationSession.propagate`,
:meth:`~AnnotationSession.train_head`, :meth:`~AnnotationSession.predict`,
:meth:`~AnnotationSession.save_labels`, :meth:`~AnnotationSession.restore_labels`).
The steps receive snapshots (an :class:`~napari_medsam.core.volume.ImageVolume`, the slice axis,
the intensity choice), never a layer or a viewer.

Embeddings never mix between images: each request names the image and the identity of its data
array, and the :class:`~napari_medsam.core.encoder.VolumeEncoder` behind it keys every slice by
the volume's content hash, the model, its weights and the preprocessing.

Signals (emitted on the thread that calls the method; the widgets call them on the main thread):
``model_changed(loaded_or_None)``, ``embeddings_changed(image_id)``, ``busy_changed(cpu_jobs)``,
``labels_changed(axis, slices)`` (a commit, undo or restore wrote these slices, or a propagation
its seed slices: the user's, reviewed), ``proposals_changed(axis, slices)`` (a propagation or its
undo wrote or erased proposals there: not reviewed, so the active-learning loop does not train on
them), ``head_changed(head_or_None)``.

Propagated slices are proposals until the user reviews them (commits, paints, accepts: see
:meth:`AnnotationSession.mark_reviewed`); a new propagation of the same class replaces its earlier
unreviewed proposals (:meth:`AnnotationSession.write_propagation`, through
:func:`~napari_medsam.core.propagation.plan_update`) and never touches a reviewed slice. The
reviewed slices are the edit log's committed ones plus, when a review loop runs on the same
labels, the loop's reviewed slices: one notion of reviewed.

A small box's preview can be zoomed (:attr:`AnnotationSession.zoom`, on by default): the quick
preview on the slice's embedding first (:meth:`~AnnotationSession.preview_steps`), then the
window around the box embedded in a worker (:meth:`~AnnotationSession.refine_steps`, one encoder
call) and decoded on it (:meth:`~AnnotationSession.refined`, one decoder call, main thread); see
:mod:`napari_medsam.core.zoom`.

The active-learning loop hangs on :attr:`AnnotationSession.loop` (None until set; see
``napari_medsam.app.loop``) and listens to ``labels_changed``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal

from ..core.progress import Progress, ProgressGen, drain
from ..core.runtime import avoid_triton_llvm_clash, worker_threads
from ..core.zoom import DEFAULT_CONTEXT, box_zoom_window, zoom_gain
from .bookkeeping import (
    ArrayLabels,
    EditLog,
    LabelEdit,
    SliceView,
    paint_masks,
    replace_slices,
    seeds_from_labels,
    volume_view,
)
from .params import IntensityChoice, ModelChoice

__all__ = ["AnnotationSession", "EncoderRequest", "default_cache_dir"]


@dataclass(frozen=True, eq=False)
class EncoderRequest:
    """A main-thread snapshot of what to embed: one image's volume along one axis."""

    image_id: int            # id() of the image (layer) it comes from
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


class AnnotationSession:
    """The model, the cache, the encoders, the classes, the labels and the edits of one annotation.

    ``cpu_jobs`` counts the running jobs that want every core (propagation, whole-image embedding,
    training, prediction; see :meth:`hold_cpu`); background prefetching waits while it is not 0.
    """

    model_changed = Signal(object)
    embeddings_changed = Signal(object)
    busy_changed = Signal(int)
    labels_changed = Signal(int, tuple)
    proposals_changed = Signal(int, tuple)
    head_changed = Signal(object)

    def __init__(self, *, cache_dir: str | os.PathLike | None = None, disk_cache: bool = True) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.disk_cache = disk_cache
        self.loaded: Any = None
        self.model_choice: ModelChoice | None = None
        self.intensity = IntensityChoice()
        self.class_names: dict[int, str] = {}  # label id -> class name
        self.napari_progress = False  # also show long jobs in napari's activity panel (see _qt._workers)
        self.edits = EditLog()        # commits and propagations: Undo, and the slices committed per class
        self.writing_proposals = False  # True while a propagation or an undo writes: paint events then are not the user's
        self.head: Any = None         # the trained or loaded TrainedHead
        self.loop: Any = None         # the active-learning loop (app.loop.ReviewLoop), None until set
        self.cpu_jobs = 0
        #: zoomed previews of small boxes: the window's side over the box's (None: off); see
        #: :meth:`zoom_window`, :meth:`refine_steps` and :meth:`refined`
        self.zoom: float | None = DEFAULT_CONTEXT
        # the session's own image (scripts, tests, the CLI); the widgets pass requests instead
        self.volume: Any = None
        self.axis = 0
        self.labels: ArrayLabels | None = None
        self._cache: Any = None
        self._encoders: dict[tuple, Any] = {}
        self._lock = threading.RLock()

    # -- jobs that need the CPU (main thread) -----------------------------------------------------------
    def hold_cpu(self, job: Any) -> Any:
        """Count ``job`` (anything with ``done`` and ``add_done_callback``, e.g. a
        :class:`~napari_medsam._qt._workers.Job`) in :attr:`cpu_jobs` until it finishes; returns it.
        A finished job (or None) is returned as it is."""
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
        """Load a model (worker thread). Yields download progress when weights must be fetched.
        Returns the :class:`~napari_medsam.core.loaded.LoadedModel`; :meth:`set_model` makes it current."""
        from ..core.build import load_model
        from ..core.registry import get_spec
        from ..core.weights import weights_available

        spec = get_spec(choice.name)
        yield Progress(0, 0, f"loading {spec.name}")
        avoid_triton_llvm_clash()
        import torch

        from ..core.runtime import configure_runtime

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

    def load_model(self, choice: ModelChoice | str | None = None) -> Any:
        """Load ``choice`` (a :class:`ModelChoice`, a model name; None: the default model) and use it;
        returns it."""
        if choice is None:
            choice = ModelChoice()
        elif isinstance(choice, str):
            choice = ModelChoice(choice)
        loaded = drain(self.load_model_steps(choice))
        self.set_model(loaded, choice)
        return loaded

    def _warm_up(self, loaded: Any) -> None:
        """Import what embedding and decoding need and run both once (worker thread).

        Importing C extensions (zarr's codecs) and torch's first kernels hold the GIL for hundreds
        of milliseconds; done here, while the user waits for Load anyway, they do not stall the
        window later during embedding or the first prompt.
        """
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

    # -- the session's own image (scripts, tests) ----------------------------------------------------------
    def open_image(self, volume: Any, *, axis: int = 0, intensity: IntensityChoice | None = None,
                   labels: np.ndarray | None = None) -> None:
        """Work on ``volume`` (an ImageVolume or an array) sliced along ``axis``, with empty labels
        (or ``labels``, an integer array of its spatial shape, written in place)."""
        from ..core.encoder import as_volume

        vol = as_volume(volume)
        if labels is None:
            labels = np.zeros(vol.spatial_shape, np.uint16)
        elif tuple(labels.shape) != tuple(vol.spatial_shape):
            from ..core.errors import InvalidImageError

            raise InvalidImageError(f"labels of shape {tuple(labels.shape)} do not fit the image's "
                                    f"{tuple(vol.spatial_shape)}")
        self.volume, self.axis = vol, int(axis) if vol.spatial_ndim == 3 else 0
        if intensity is not None:
            self.intensity = intensity
        if self.labels is not None:
            self.edits.forget(self.labels)
        self.labels = ArrayLabels(labels)

    def request(self) -> EncoderRequest:
        """The :class:`EncoderRequest` of the session's own image (see :meth:`open_image`)."""
        if self.volume is None:
            from ..core.errors import MedSamError

            raise MedSamError("no image is open in this session: call open_image(volume) first")
        return EncoderRequest(image_id=id(self.volume), data_id=id(self.volume.data), volume=self.volume,
                              axis=self.axis, intensity=self.intensity, name=str(self.volume.source or "image"))

    def view(self, index: int) -> SliceView:
        """Slice ``index`` of the session's own image along its axis."""
        return volume_view(tuple(self.volume.spatial_shape), self.axis, index)

    # -- encoders -----------------------------------------------------------------------------------
    def encoder(self, req: EncoderRequest | None = None) -> Any:
        """The encoder for ``req`` (default: the session's own image), built on first use (worker
        thread: it samples intensities and hashes the volume). Raises
        :class:`~napari_medsam.core.errors.MedSamError` without a model."""
        from ..core.encoder import VolumeEncoder
        from ..core.errors import MedSamError
        from ..core.preprocess import compute_intensity

        req = req if req is not None else self.request()
        with self._lock:
            loaded = self.loaded
            enc = self._encoders.get(req.key)
            if enc is not None and enc.loaded is loaded:
                return enc
        if loaded is None:
            raise MedSamError("no model is loaded: choose one in the MedSAM Model widget and press Load "
                              "(in a script: session.load_model(...))")
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
        """Drop the encoders of a removed image (its embeddings stay in the cache)."""
        with self._lock:
            for key in [k for k in self._encoders if k[0] == image_id]:
                del self._encoders[key]

    # -- long work (worker thread) ----------------------------------------------------------------------
    def embed_steps(self, req: EncoderRequest | None = None, current: Callable[[], int] | None = None, *,
                    cancel: threading.Event | None = None) -> ProgressGen[dict]:
        """Embed every slice of ``req``, nearest the slice under view first.

        ``current()`` returns the slice under view; it is read again before every batch, so moving
        through the volume while it embeds moves the work there.
        """
        req = req if req is not None else self.request()
        yield Progress(0, 0, "preparing")
        with worker_threads():
            return (yield from self._embed(req, current, cancel))

    def embed(self, req: EncoderRequest | None = None) -> dict:
        """Embed every slice of ``req`` (default: the session's own image); returns a summary."""
        return drain(self.embed_steps(req))

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

    def preview_steps(self, req: EncoderRequest | None, index: int, prompt: Any) -> ProgressGen[Any]:
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

    def embed_slice_steps(self, req: EncoderRequest | None, index: int) -> ProgressGen[bool]:
        """Embed slice ``index`` of ``req`` (a prompt's slice) at the caller's priority and keep it as
        the encoder's last slice, so that a preview of it is then one decoder call; returns True if
        it was computed now (False: it was cached). The step ``"embedded"`` comes as soon as the
        slice can be decoded; its cache write (20-200 ms) follows, before the last step."""
        yield Progress(0, 2, "embedding")
        t0 = time.perf_counter()
        with worker_threads(background_busy=self.cpu_jobs > 0):
            enc = self.encoder(req)
            cached = enc.is_cached(index)
            enc.get(index, store=False)
        try:
            yield Progress(1, 2, "embedded", {"embedded_now": not cached, "seconds": time.perf_counter() - t0})
        finally:
            enc.flush([index])
        yield Progress(2, 2, "stored")
        return not cached

    def embedded(self, req: EncoderRequest | None, index: int) -> bool:
        """True when slice ``index`` of ``req`` is embedded and its encoder built, so that a preview of
        it is one decoder call (no hashing, no encoder pass). Never builds anything nor waits for a
        running encoder call."""
        enc = self.peek_encoder(req if req is not None else self.request())
        return enc is not None and enc.hash_known and enc.is_cached(index)

    def preview(self, index: int, prompt: Any, req: EncoderRequest | None = None) -> Any:
        """The mask ``prompt`` (a :class:`~napari_medsam.core.segment.Prompt2D`) gives on slice
        ``index`` of ``req`` (default: the session's own image); nothing is written."""
        return drain(self.preview_steps(req if req is not None else self.request(), index, prompt))

    # -- zoom: a small box decoded again on the embedding of the window around it -------------------
    @staticmethod
    def slice_shape(req: EncoderRequest) -> tuple[int, int]:
        """The shape of a slice of ``req``'s image along its axis (cheap: no encoder)."""
        return req.volume.slice_shape(req.axis)

    def zoom_window(self, req: EncoderRequest | None, index: int, prompt: Any) -> tuple[int, int, int, int] | None:
        """The window a zoomed preview of ``prompt`` on slice ``index`` of ``req`` decodes on, or
        None (zoom off, no box, or a box too large to gain from it: :func:`box_zoom_window`).
        Cheap (main thread): no encoder call, no encoder built."""
        req = req if req is not None else self.request()
        return box_zoom_window(prompt, self.slice_shape(req), self.zoom)

    def refine_steps(self, req: EncoderRequest | None, index: int, prompt: Any) -> ProgressGen[bool]:
        """Embed the window of ``prompt`` (worker thread): one encoder call, not cached (the encoder
        remembers its last few windows, so :meth:`refined` is then one decoder call). Yields
        ``Progress(1, 1, "embedded", {"window", "gain", "seconds"})`` when the window's embedding is
        ready; returns True, or False when there is no window (:meth:`zoom_window`)."""
        req = req if req is not None else self.request()
        window = self.zoom_window(req, index, prompt)
        yield Progress(0, 1, "zooming")
        if window is None:
            return False
        from ..core.segment import validate_prompt

        validate_prompt(prompt, self.slice_shape(req))  # in the slice's terms, not the window's
        t0 = time.perf_counter()
        with worker_threads(background_busy=self.cpu_jobs > 0):
            enc = self.encoder(req)
            enc.embed_window(int(index), window)
        yield Progress(1, 1, "embedded", {"window": window, "gain": zoom_gain(window, self.slice_shape(req)),
                                          "seconds": time.perf_counter() - t0})
        return True

    def zoom_ready(self, req: EncoderRequest | None, index: int, prompt: Any) -> bool:
        """:meth:`refined` of ``prompt`` is one decoder call now: its window's embedding is remembered
        by the encoder (after :meth:`refine_steps`; the encoder keeps its last 8 windows). Cheap:
        builds nothing."""
        req = req if req is not None else self.request()
        window = self.zoom_window(req, index, prompt)
        enc = self.peek_encoder(req)
        return window is not None and enc is not None and enc.has_window(int(index), window)

    def refined(self, req: EncoderRequest | None, index: int, prompt: Any) -> Any:
        """The zoomed :class:`~napari_medsam.core.segment.MaskResult` of ``prompt`` on slice
        ``index``: on the slice's grid, zero outside the window (its ``logits`` are in the window's
        model frame), or None when there is no window. After :meth:`refine_steps` it is one decoder
        call (main thread); without it, it embeds the window first."""
        from ..core.zoom import decode_zoomed

        req = req if req is not None else self.request()
        window = self.zoom_window(req, index, prompt)
        if window is None:
            return None
        (res,), _emb = decode_zoomed(self.encoder(req), int(index), prompt, window)
        return res

    def refine(self, index: int, prompt: Any, req: EncoderRequest | None = None) -> Any:
        """:meth:`refine_steps` then :meth:`refined` (a script's verb): the zoomed mask, or None."""
        req = req if req is not None else self.request()
        if not drain(self.refine_steps(req, index, prompt)):
            return None
        return self.refined(req, index, prompt)

    def propagate_steps(self, req: EncoderRequest | None, seeds: Mapping[int, Any], params: Any = None, *,
                        cancel: threading.Event | None = None, span: tuple[int, int] | None = None,
                        ) -> ProgressGen[Any]:
        """Propagate one object from ``seeds`` ({slice: Prompt2D}) through the volume, within the
        half-open slice range ``span`` (None: all); returns a
        :class:`~napari_medsam.core.propagation.Propagation` (``{slice: mask}`` naming seeds and
        proposals; nothing is written: see :meth:`write_propagation`)."""
        from ..core.propagation import PropagationParams, propagate

        req = req if req is not None else self.request()
        lo, hi = span if span is not None else (None, None)
        yield Progress(0, 0, "preparing")
        with worker_threads():
            enc = self.encoder(req)
            masks = yield from propagate(enc, dict(seeds), params=params or PropagationParams(), start=lo, stop=hi,
                                         cancel=cancel)
        return masks

    def train_head_steps(self, req: EncoderRequest | None, labels: np.ndarray, slices: Sequence[int] | None = None,
                         params: Any = None, *, class_names: Mapping[int, str] | Sequence[str] | None = None,
                         init: Any = None, cancel: threading.Event | None = None) -> ProgressGen[Any]:
        """Train a head on the labelled slices of ``labels`` (a snapshot: the user may keep
        painting) over ``req``'s image; returns the TrainedHead (:meth:`set_head` keeps it)."""
        from .training import train_head_steps

        req = req if req is not None else self.request()
        names = class_names if class_names is not None else dict(self.class_names)
        with worker_threads():
            enc = self.encoder(req)
        return (yield from train_head_steps(enc, labels, slices, params, class_names=names, init=init,
                                            cancel=cancel, threads=worker_threads))

    def predict_steps(self, volume: Any = None, head: Any = None, *, cancel: threading.Event | None = None,
                      return_probs: bool = False) -> ProgressGen[Any]:
        """Segment every slice of ``volume`` (default: the session's own image) with ``head``
        (default: :attr:`head`), no prompt. Returns a :class:`~napari_medsam.core.infer.PredictionResult`."""
        from ..core.errors import MedSamError
        from ..core.infer import encoder_for_head, predict_slices

        volume = volume if volume is not None else self.request().volume
        head = head if head is not None else self.head
        if head is None:
            raise MedSamError("no head: train one (Train) or load a head file first")
        if self.loaded is None:
            raise MedSamError(f"load {head.meta.backbone} first: the head was trained on it")
        yield Progress(0, 0, "preparing")
        with worker_threads():
            enc = encoder_for_head(self.loaded, volume, head, cache=self.cache)
            result = yield from predict_slices(enc, head, cancel=cancel, return_probs=return_probs)
        return result

    def set_head(self, head: Any) -> None:
        """Keep ``head`` as the session's head (main thread)."""
        self.head = head
        self.head_changed.emit(head)

    # -- adapters (core.adapt): the encoder itself adapted ------------------------------------------------
    def set_adapter(self, adapted: Any) -> None:
        """Use ``adapted`` (an adapted LoadedModel or a TrainedAdapter) as the model from now on
        (main thread). Its variant names the adapter's weights, so its embeddings are cached apart
        and the encoders are rebuilt (``model_changed`` is emitted)."""
        self.set_model(getattr(adapted, "loaded", adapted), self.model_choice)

    def remove_adapter(self) -> None:
        """Go back to the plain model the adapted one was made from (main thread)."""
        from ..core.adapt import adapter_config, base_model

        if self.loaded is not None and adapter_config(self.loaded) is not None:
            self.set_model(base_model(self.loaded), self.model_choice)

    def train_adapter_steps(self, req: EncoderRequest | None, labels: np.ndarray, slices: Sequence[int] | None = None,
                            config: Any = None, params: Any = None, *,
                            cancel: threading.Event | None = None) -> ProgressGen[Any]:
        """Train adapters + mask decoder (:func:`~napari_medsam.core.adapt.train_adapters`) on the
        labelled slices of ``labels`` (a snapshot) over ``req``'s image. First yields
        ``Progress(0, steps, "estimated", {"estimate_s", "step_s"})`` (timed on this machine now,
        :func:`~napari_medsam.core.adapt.estimate_seconds`); returns the TrainedAdapter
        (:meth:`set_adapter` applies it)."""
        from ..core.adapt import AdapterConfig, AdaptParams, estimate_seconds, train_adapters
        from ..core.finetune import labelled_slices

        req = req if req is not None else self.request()
        config = config if config is not None else AdapterConfig()
        params = params if params is not None else AdaptParams()
        yield Progress(0, 0, "estimating the training time")
        with worker_threads():
            enc = self.encoder(req)
        n = len(slices) if slices else (len(labelled_slices(labels, enc.axis)) if enc.is_3d else 1)
        est = estimate_seconds(enc.loaded, config, params, n_slices=max(1, n))
        yield Progress(0, params.steps, "estimated", {"estimate_s": est["total_s"], "step_s": est["step_s"],
                                                      "n_slices": n})
        return (yield from train_adapters(enc, labels, slices, config=config, params=params, cancel=cancel))

    # -- labels: commit, propagate, undo (main thread) -------------------------------------------------------
    def write_masks(self, target: Any, view: SliceView, masks: Mapping[int, np.ndarray], label_id: int, *,
                    keep: Sequence[int] = (), description: str = "commit") -> LabelEdit | None:
        """Write ``masks`` ({slice: (H, W) bool}) into ``target`` (a napari Labels layer or
        :class:`ArrayLabels`; None: the session's own labels) as class ``label_id``, where the
        labels are 0 and not on the ``keep`` slices. Records the edit (Undo) and the slices as
        committed (propagation seeds), emits ``labels_changed``; returns the edit (None: nothing new)."""
        target = self._target(target)
        todo = {int(z): m for z, m in masks.items() if int(z) not in set(keep)}
        edit = paint_masks(target, view, todo, label_id, description=description)
        slices = tuple(sorted(int(z) for z in masks))
        self.edits.record(target, label_id, view.axis, slices, edit)
        if edit is not None:
            self.labels_changed.emit(int(view.axis), tuple(sorted(set(edit.slices))))
        return edit

    def commit(self, index: int, mask: Any, label_id: int = 1, *, target: Any = None,
               view: SliceView | None = None, name: str | None = None) -> LabelEdit | None:
        """Write one preview (a mask, or a MaskResult) on slice ``index`` as class ``label_id``."""
        mask = getattr(mask, "mask", mask)
        view = view if view is not None else self.view(index)
        name = name or self.class_names.get(int(label_id), f"label {label_id}")
        return self.write_masks(target, view, {int(index): np.asarray(mask, bool)}, label_id,
                                description=f"commit {name} on slice {index}")

    def seeds(self, label_id: int, view: SliceView, *, target: Any,
              prompts: Mapping[int, Any] | None = None) -> tuple[dict[int, Any], set[int]]:
        """The prompts a propagation of ``label_id`` in ``target`` (None: no labels yet) starts from
        (``prompts`` on their slices, then the slices committed for it) and the slices it keeps; see
        :func:`~napari_medsam.app.bookkeeping.seeds_from_labels`."""
        done = self.edits.committed(target, label_id, view.axis) if target is not None else set()
        return seeds_from_labels(prompts or {}, target, view, label_id, done)

    def propagate(self, label_id: int = 1, *, prompts: Mapping[int, Any] | None = None, index: int | None = None,
                  params: Any = None, span: tuple[int, int] | None = None) -> Mapping[int, np.ndarray]:
        """Carry class ``label_id`` of the session's own labels through its image (within the
        half-open slice range ``span``) from its reviewed slices (and ``prompts``); writes the
        other slices as proposals, replacing the class's earlier ones; returns the propagation."""
        from ..core.errors import MedSamError

        view = self.view(index if index is not None else 0)
        seeds, _kept = self.seeds(label_id, view, target=self._target(None), prompts=prompts)
        if not seeds:
            raise MedSamError(f"nothing to propagate for label {label_id}: commit a slice of it first")
        masks = drain(self.propagate_steps(self.request(), seeds, params, span=span))
        name = self.class_names.get(int(label_id), f"label {label_id}")
        self.write_propagation(None, view, masks, label_id, seeds=seeds, description=f"propagate {name}")
        return masks

    def reviewed(self, target: Any, label_id: int, axis: int) -> set[int]:
        """The slices of ``target`` along ``axis`` a propagation of ``label_id`` must keep: the
        class's committed slices, and the review loop's reviewed slices when it runs on the same labels."""
        done = self.edits.committed(target, label_id, axis)
        loop = self.loop
        if loop is not None and getattr(loop, "labels", None) is getattr(target, "data", None) and loop.axis == axis:
            done |= set(loop.reviewed())
        return done

    def write_propagation(self, target: Any, view: SliceView, masks: Mapping[int, np.ndarray], label_id: int, *,
                          seeds: Any = (), description: str = "propagate") -> LabelEdit | None:
        """Write a propagation of class ``label_id`` into ``target`` (None: the session's labels):
        the earlier unreviewed proposals of the class are erased, the new masks written on every
        slice not reviewed (where the labels are 0); the prompted ``seeds`` slices count as reviewed,
        the others are proposals. Emits ``proposals_changed`` (and ``labels_changed`` for seeds
        written); returns the edit (Undo brings the earlier proposals back)."""
        from ..core.propagation import plan_update

        target = self._target(target)
        axis = int(view.axis)
        seed_slices = {int(z) for z in getattr(masks, "seeds", ())} | {int(z) for z in seeds}
        reviewed = self.reviewed(target, label_id, axis)
        old = self.edits.proposed(target, label_id, axis)
        write, clear = plan_update(masks, proposals=old, reviewed=reviewed)
        new_proposals = sorted(set(write) - seed_slices)
        self.writing_proposals = True
        try:
            edit = replace_slices(target, view, write, clear, label_id, description=description,
                                  proposals=set(new_proposals) | clear)
        finally:
            self.writing_proposals = False
        seeded = sorted(set(write) & seed_slices)
        self.edits.record(target, label_id, axis, seeded, edit, proposals=new_proposals)
        if edit is not None:
            changed = set(edit.slices)
            if changed - set(seeded):
                self.proposals_changed.emit(axis, tuple(sorted(changed - set(seeded))))
            if changed & set(seeded):
                self.labels_changed.emit(axis, tuple(sorted(changed & set(seeded))))
        return edit

    def mark_reviewed(self, target: Any, axis: int, slices: Sequence[int]) -> set[int]:
        """The user painted, erased or accepted ``slices`` of ``target`` (None: the session's
        labels): a proposal there is reviewed from now on. Returns the slices that were proposals."""
        return self.edits.review(self._target(target), axis, slices)

    def undo(self, usable: Callable[[Any], bool] = lambda _t: True) -> LabelEdit | None:
        """Undo the newest commit or propagation whose target is ``usable``; returns it (None: nothing)."""
        self.writing_proposals = True
        try:
            done = self.edits.undo(usable)
        finally:
            self.writing_proposals = False
        if done is None:
            return None
        _target, edit = done
        proposals = set(edit.proposals)
        if set(edit.slices) - proposals:
            self.labels_changed.emit(int(edit.axis), tuple(sorted(set(edit.slices) - proposals)))
        if set(edit.slices) & proposals:
            self.proposals_changed.emit(int(edit.axis), tuple(sorted(set(edit.slices) & proposals)))
        return edit

    def _target(self, target: Any) -> Any:
        if target is not None:
            return target
        if self.labels is None:
            from ..core.errors import MedSamError

            raise MedSamError("no labels to write into: call open_image(volume) first")
        return self.labels

    # -- head and prediction, plain verbs ------------------------------------------------------------------
    def train_head(self, params: Any = None, slices: Sequence[int] | None = None, *,
                   class_names: Mapping[int, str] | Sequence[str] | None = None) -> Any:
        """Train a head on the session's own labels (a snapshot) and keep it; returns it."""
        labels = np.array(self._target(None).data, copy=True)
        head = drain(self.train_head_steps(self.request(), labels, slices, params, class_names=class_names))
        self.set_head(head)
        return head

    def predict(self, volume: Any = None, *, return_probs: bool = False) -> Any:
        """Segment ``volume`` (default: the session's own image) with the session's head."""
        return drain(self.predict_steps(volume, return_probs=return_probs))

    # -- save and restore --------------------------------------------------------------------------------
    def save_labels(self, path: str | os.PathLike, labels: np.ndarray | None = None, *, name: str = "labels") -> Path:
        """Write the session's labels (or ``labels``) with its image's geometry (NIfTI, TIFF, ... by
        extension, through :func:`napari_medsam.io.write_labels`); returns the path written."""
        from ..io import write_labels

        data = labels if labels is not None else self._target(None).data
        return Path(write_labels(path, np.asarray(data), reference=self.volume, name=name))

    def restore_labels(self, path: str | os.PathLike) -> np.ndarray:
        """Read labels written by :meth:`save_labels` (or any label file of the image's shape) into
        the session's labels; every slice holding a class counts as committed for it (they seed
        propagation and are not overwritten). The undo log of the old labels is dropped."""
        from ..core.errors import InvalidImageError
        from ..io import read_image

        data = np.asarray(read_image(path, lazy=False).data[...])
        if self.volume is None or tuple(data.shape) != tuple(self.volume.spatial_shape):
            raise InvalidImageError(f"{path}: labels of shape {tuple(data.shape)} do not fit the open image"
                                    + ("" if self.volume is None else f" {tuple(self.volume.spatial_shape)}"))
        if data.dtype.kind == "f" and not np.all(data == np.round(data)):
            raise InvalidImageError(f"{path}: labels must be whole numbers (0 background, 1..K classes)")
        target = self._target(None)
        self.edits.forget(target)
        target.data = np.ascontiguousarray(data.astype(np.uint16 if data.max(initial=0) < 65536 else np.int64))
        other = tuple(a for a in range(target.data.ndim) if a != self.axis)
        present = np.nonzero(target.data.any(axis=other))[0] if target.data.ndim == 3 else np.array([0])
        for c in np.unique(target.data):
            if c == 0:
                continue
            held = np.nonzero((target.data == c).any(axis=other))[0] if target.data.ndim == 3 else [0]
            self.edits.record(target, int(c), self.axis, held, None)
        self.labels_changed.emit(int(self.axis), tuple(int(z) for z in present))
        return target.data


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
