"""The process-wide CPU policy: intra-op threads, glibc's allocator, per-thread budgets.

Apart from :mod:`~napari_medsam.core.speed` (which transforms a model and is exact): everything
here changes the *process*, not a network, and nothing runs on import.

* :func:`configure_runtime` is what an application opts into once, where it starts (a command's
  ``main``, a widget's Load button; a library user may): the intra-op thread count and glibc's
  allocator thresholds. Both are global, which is why they are a separate, explicit call.
* :func:`worker_threads` is the per-thread budget of a worker (GUI or session job):
  all cores but one on 4 cores or more, one core for a click while a job holds the rest.
* :func:`avoid_triton_llvm_clash` keeps torch from importing triton where Mesa's LLVM is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "RuntimeSettings",
    "available_cpus",
    "avoid_triton_llvm_clash",
    "busy_cpus_elsewhere",
    "configure_runtime",
    "interactive_threads",
    "physical_cpus",
    "recommended_threads",
    "worker_threads",
]

_log = logging.getLogger(__name__)

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


@contextlib.contextmanager
def worker_threads(*, background_busy: bool = False) -> Iterator[None]:
    """On 4 cores or more, run torch on all cores but one in this (worker) thread, leaving one to
    the GUI thread. With 2 cores it changes nothing: halving the encoder's threads cost 40 % of its
    speed there (benchmarks/bench_gui.py) while the window stayed as responsive either way.
    ``background_busy``: another job (training, propagation) holds the cores: an interactive
    decode then takes the one core it left (:func:`interactive_threads`).

    With PyTorch's OpenMP backend the count is per calling thread; it is restored on exit.
    """
    import torch

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
