"""Inference speed: how a loaded model is prepared to run fast, and the CPU runtime policy.

Nothing here runs on import. Two entry points:

* :func:`optimize_for_inference` prepares a :class:`~napari_medsam.core.build.LoadedModel`:
  row-banded execution of the full-resolution conv stage on CPU (exact: same arithmetic on the
  same pixels, in smaller pieces), optional int8 dynamic quantization of the encoder's
  matrix multiplies (changes embeddings beyond round-off, so the returned model has another
  ``variant`` and therefore other cache keys), optional ``torch.compile``. ``load_model`` calls it
  with the exact defaults.
* :func:`configure_runtime` is the process-wide CPU policy an application opts into once, where
  it starts (a command's ``main``, a widget's Load button; a library user may): the intra-op
  thread count and glibc's allocator thresholds. Both are global, which is why they are a
  separate, explicit call.

Measured on an idle 2-core AVX2 CPU (``benchmarks/bench_encoder.py``, see ``docs/benchmarks.md``):
LiteMedSAM embeds a slice 2.1x faster than the reference NCHW forward run the way other tools run
it (a process of its own with PyTorch's and glibc's defaults; 1.9-2.2x over six runs), and 1.2x
faster than that forward under this runtime policy; the masks are identical. The matrix products
then run at ~94 % of the fp32 peak. Rejected there: bf16 (no native bf16 on such CPUs:
``torch.mm`` runs at ~1 GFLOP/s), int8 (masks IoU 0.84), ``torch.compile`` (slower than this
eager code), batching slices on CPU (no faster, see :func:`encoder_call_size`).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

from .build import LoadedModel

__all__ = [
    "INT8_VARIANT",
    "RuntimeSettings",
    "available_cpus",
    "busy_cpus_elsewhere",
    "physical_cpus",
    "configure_runtime",
    "encoder_call_size",
    "optimize_for_inference",
    "recommended_threads",
    "set_band_rows",
]

_log = logging.getLogger(__name__)

#: Appended to ``LoadedModel.variant`` (and so to every embedding cache key) by int8 quantization.
INT8_VARIANT = "+int8dyn"
#: Rows per band for the full-resolution conv stage on CPU. Banding keeps every activation below
#: ~20 MiB (LiteMedSAM: 66 rows x 256 columns x 256 channels x 4 B = 17 MiB instead of 64 MiB),
#: which is what glibc serves from its heap instead of fresh page-faulted mmaps: ~1.3x faster in a
#: worker thread (the GUI path, where glibc's per-thread arenas mmap anything above 64 MiB) and
#: ~1.08x in the main thread with glibc's defaults; neutral once :func:`configure_runtime` tuned
#: the allocator. Four bands add few kernel launches, so multi-threaded runs lose nothing.
DEFAULT_BAND_ROWS = 64

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


# --------------------------------------------------------------------------------------------- runtime


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; cgroup-pinned containers included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def physical_cpus() -> int:
    """CPUs this process may use, counting one per physical core (hyper-threads share FMA units)."""
    n = available_cpus()
    try:
        import psutil

        phys = psutil.cpu_count(logical=False)
        logical = psutil.cpu_count(logical=True)
        if phys and logical and logical > phys:
            n = max(1, n * phys // logical)
    except ImportError:
        pass
    return n


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process) from ``/proc`` (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy, int(own[11]) + int(own[12])  # utime + stime (fields 14, 15 of /proc/self/stat)


def busy_cpus_elsewhere(window: float = 0.2) -> float | None:
    """Cores kept busy by *other* processes right now: machine-wide CPU time over ``window``
    seconds minus this process's own; None where ``/proc`` is not available.

    Not the load average: that counts this process's own recent work too (an embedding finished
    a minute ago makes a quiet machine look busy) and lags by a minute.
    """
    import time

    a = _cpu_ticks()
    if a is None:
        return None
    t0 = time.perf_counter()
    time.sleep(window)
    b = _cpu_ticks()
    dt = time.perf_counter() - t0
    if b is None or dt <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = ((b[0] - a[0]) - (b[1] - a[1])) / (hz * dt)
    return max(0.0, others)


def recommended_threads(*, load_aware: bool = True) -> int:
    """Intra-op threads for the encoder: one per physical core that other processes leave free.

    A second thread per core only adds contention to the matrix multiplies. Cores kept busy by
    other processes (:func:`busy_cpus_elsewhere`, measured for 0.2 s; a core counts as busy from
    75 % use) are left alone: OpenMP's barriers make a thread that shares its core with another
    process stall all the others, and on a 2-core machine with two busy neighbours 2 threads
    measured 2x *slower* than 1 (``napari-medsam bench``, threads table). This process's own work
    never counts (the load average did: right after an embedding, a quiet 2-core machine got 1
    thread and ran 1.6x slower than with 2). Without ``/proc`` all physical cores are used.
    """
    n = physical_cpus()
    if load_aware:
        others = busy_cpus_elsewhere()
        if others is not None:
            n = max(1, min(n, available_cpus() - int(others + 0.25)))
    return n


def interactive_threads(current: int, *, background_busy: bool) -> int:
    """Torch threads for an interactive decode (a click) in this process.

    ``current``: the thread count in use; ``background_busy``: a job of this process (head
    training, propagation, embedding a whole volume) holds the cores. Training takes all cores but
    one by default (:func:`napari_medsam.core.finetune.default_threads`), so a click then gets the
    one left: a second decoder thread would share a core with the job, and OpenMP's barriers make
    the whole decode wait for it. Measured with ``benchmarks/bench_train_latency.py`` on 2 cores
    (LiteMedSAM, one box): 2 decoder threads while a head trains 4.6x the idle latency, 1 thread 1.06x.
    """
    return 1 if background_busy else max(1, int(current))


@dataclass(frozen=True)
class RuntimeSettings:
    """What :func:`configure_runtime` set (and what to pass back to undo the thread count)."""

    threads: int
    previous_threads: int
    allocator_tuned: bool


def _tune_glibc_allocator(mmap_threshold: int, trim_threshold: int) -> bool:
    """Serve tensors below ``mmap_threshold`` bytes from the reused heap instead of fresh mmaps.

    glibc's default hands every allocation above 32 MiB to a new ``mmap`` and returns it to the
    kernel on free, so each full-resolution activation is page-faulted in again on every slice
    (a 64 MiB tensor costs ~45 ms of faults on this class of CPU, more than the GELU applied to
    it). PyTorch's CPU tuning guide recommends jemalloc/tcmalloc for the same reason; this is the
    no-dependency equivalent. Only glibc (Linux) is touched; returns whether it was applied.
    """
    name = ctypes.util.find_library("c")
    if not name or "libc" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    return ok


def configure_runtime(threads: int | None = None, *, allocator: bool = True,
                      mmap_threshold: int = 128 * 2**20, trim_threshold: int = 256 * 2**20) -> RuntimeSettings:
    """Set the process-wide CPU policy for inference; call once, from an application.

    ``threads``: intra-op threads (default :func:`recommended_threads`). ``allocator``: keep
    tensors up to ``mmap_threshold`` bytes on glibc's heap (freed memory above
    ``trim_threshold`` still goes back to the system), see :func:`_tune_glibc_allocator`.
    """
    import torch

    prev = torch.get_num_threads()
    n = int(threads) if threads else recommended_threads()
    if n != prev:
        torch.set_num_threads(n)
    tuned = _tune_glibc_allocator(mmap_threshold, trim_threshold) if allocator else False
    _log.debug("runtime: %d threads (was %d), allocator tuned: %s", n, prev, tuned)
    return RuntimeSettings(threads=n, previous_threads=prev, allocator_tuned=tuned)


# --------------------------------------------------------------------------------------------- model


def encoder_call_size(loaded: LoadedModel, n: int) -> int:
    """Slices per encoder call for a batch of ``n``: all of them on a GPU, one on a CPU.

    On a CPU a batch gains nothing (every matrix multiply already has thousands of rows) and
    multiplies the size of every activation, which then falls out of the cache and, above the
    allocator's thresholds, is page-faulted in afresh: batch 4 measured 1.0-1.3x slower per
    slice than four single calls. Results are identical either way.
    """
    return max(1, n) if loaded.device.type != "cpu" else 1


def set_band_rows(encoder: Any, rows: int) -> int:
    """Set the row band of the banded modules (MBConv, PatchMerging) in ``encoder``'s conv stages
    (0: whole tensors); returns how many were set. Encoders without a conv stage are left alone."""
    from .nets.tiny_vit import ConvStage

    n = 0
    for stage in encoder.modules():
        if isinstance(stage, ConvStage):
            for m in stage.modules():
                if hasattr(m, "band_rows"):
                    m.band_rows = int(rows)
                    n += 1
    return n


def _quantize_int8(encoder: Any) -> Any:
    """A copy of ``encoder`` whose linear layers and 1x1 convs run as int8 dynamic-quantized matmuls.

    Weights are quantized per output channel once; activations per tensor at run time (FBGEMM
    on x86, QNNPACK on ARM). Depthwise and 3x3 convs, attention and norms stay fp32.
    """
    import torch
    from torch import nn

    from .nets.tiny_vit import _is_pointwise_conv

    enc = copy.deepcopy(encoder)
    for parent in list(enc.modules()):
        for name, child in list(parent.named_children()):
            if _is_pointwise_conv(child):
                lin = nn.Linear(child.in_channels, child.out_channels, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.flatten(1))
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, UserWarning):  # torch.ao's own deprecation notices
            warnings.simplefilter("ignore", category)
        return torch.ao.quantization.quantize_dynamic(enc, {nn.Linear: qconfig}, dtype=torch.qint8)


def optimize_for_inference(loaded: LoadedModel, *, band_rows: int | None = None, int8: bool = False,
                           compile: bool = False) -> LoadedModel:  # noqa: A002 - torch's own word
    """``loaded`` prepared for fast inference; the encoder's outputs stay fp32-equal unless ``int8``.

    ``band_rows``: rows per band for the full-resolution conv stage (None: 64 on CPU, off on GPUs,
    where whole tensors keep the device busy). ``int8``: dynamic int8 quantization of the
    encoder's linear layers and 1x1 convs (CPU only); the returned model shares the decoder with
    ``loaded``, has its own quantized encoder, runs without autocast (fp32 activations around the
    int8 products, whatever precision ``loaded`` had) and has ``variant`` ``+int8dyn``, so its
    embeddings are cached apart. ``compile``: ``torch.compile`` the encoder in place (first call compiles, tens
    of seconds to minutes; the compiled kernels are cached on disk by inductor).

    Returns a new :class:`LoadedModel` when int8 changed the encoder, else ``loaded`` itself.
    """
    from .errors import DeviceError

    model = loaded.model
    on_cpu = loaded.device.type == "cpu"
    rows = (DEFAULT_BAND_ROWS if on_cpu else 0) if band_rows is None else int(band_rows)
    set_band_rows(model.image_encoder, rows)
    out = loaded
    if int8 and INT8_VARIANT not in loaded.variant:
        if not on_cpu:
            raise DeviceError("int8 quantization runs on the CPU only; drop --int8 or use --device cpu")
        from .nets.sam import SamModel

        q = SamModel(image_encoder=_quantize_int8(model.image_encoder), prompt_encoder=model.prompt_encoder,
                     mask_decoder=model.mask_decoder).eval()
        # int8 products take fp32 activations: autocast (bf16 where the CPU has it) must not feed them
        # bf16 tensors (FBGEMM's packed weights then refuse the shapes), so the int8 variant runs fp32.
        out = dataclasses.replace(loaded, model=q, dtype=None, variant=loaded.variant + INT8_VARIANT)
    if compile:
        _compile_encoder(out.model.image_encoder)
    return out


def _compile_encoder(encoder: Any) -> None:
    """``torch.compile`` the encoder in place (module identity and state dict keys unchanged)."""
    if getattr(encoder, "_compiled_call_impl", None) is None:
        encoder.compile(dynamic=False)
