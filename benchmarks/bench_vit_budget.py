"""SAM ViT encoder time budget on a CPU: where one slice's time goes, by part of the network and kind of op.

Random weights in the published layout (timings only: the values do not change the work), one real
MNI152 T1 slice as input, ``torch.profiler`` over ``--slices`` forwards after a warm-up. Every op's
own CPU time is put under the innermost part of the network it ran in (patch embed, layer norms,
window partition / unpartition, window or global attention, the relative-position bias, MLP, the
residual adds of the block, the neck) and, within it, under its kind (products, softmax, copies,
adds, ...). Page faults and thread CPU time per slice are taken from runs without the profiler::

    OMP_NUM_THREADS=1 python benchmarks/bench_vit_budget.py --threads 1                 # ViT-B, bf16
    OMP_NUM_THREADS=1 python benchmarks/bench_vit_budget.py --threads 1 --precision fp32
    OMP_NUM_THREADS=1 python benchmarks/bench_vit_budget.py --threads 1 --rev eba88ae      # an older vit.py

The scopes are set by wrapping the network's modules and helpers here, in the harness (the
network carries no counters).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

#: op name -> kind (anything else: "other ops")
KINDS = {
    "products": ("aten::addmm", "aten::addmm_", "aten::mm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
                 "aten::mkldnn_convolution", "mkldnn::_convolution_pointwise", "aten::_convolution",
                 "aten::convolution_overrideable"),
    "fused attention kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                               "aten::_scaled_dot_product_attention_math"),
    "softmax": ("aten::_softmax",),
    "copies / casts / pads": ("aten::copy_", "aten::cat", "aten::fill_", "aten::constant_pad_nd", "aten::clone",
                              "aten::_to_copy", "aten::zero_", "aten::index"),
    "adds": ("aten::add", "aten::add_"),
    "layer norm kernel": ("aten::native_layer_norm",),
    "gelu": ("aten::gelu", "aten::gelu_"),
    "allocation": ("aten::empty", "aten::empty_strided", "aten::empty_like"),
}
_KIND_OF = {op: k for k, ops in KINDS.items() for op in ops}



def _load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])

def _scoped(name: str, fn: Any) -> Any:
    from torch.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        with record_function(name):
            return fn(*a, **kw)
    return wrapper


@contextlib.contextmanager
def scopes(enc: Any, vit: Any = None) -> Any:
    """Wrap the encoder's parts in ``record_function`` scopes named ``scope:<part>`` (``vit``: the
    module the encoder's classes come from; default the package's)."""
    if vit is None:
        from napari_medsam.core.nets import vit

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, attr: str, name: str) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, _scoped("scope:" + name, getattr(obj, attr)))

    patch(enc.patch_embed, "forward", "patch embed + pos embed")
    conv1, ln1, conv2, ln2 = enc.neck
    patch(ln1, "forward_channels_last", "neck")
    patch(conv2, "forward", "neck")
    patch(ln2, "forward", "neck")
    for blk in enc.blocks:
        kind = "window" if blk.window_size > 0 else "global"
        patch(blk, "forward", f"block residual adds ({kind} blocks)")
        patch(blk.norm1, "forward", "layer norms")
        patch(blk.norm2, "forward", "layer norms")
        patch(blk.attn, "forward", f"{kind} attention")
        if hasattr(blk.attn, "attend"):
            patch(blk.attn, "attend", f"{kind} attention")
        patch(blk.mlp, "forward", "MLP")
    for fn, name in (("_window_partition", "window partition (pad, permute)"),
                     ("_window_unpartition", "window unpartition (permute, crop)"),
                     ("_to_windows", "window partition (pad, permute)"),
                     ("_from_windows", "window unpartition (permute, crop)"),
                     ("_get_rel_pos", "relative-position bias"), ("pointwise", "neck"),
                     ("linear", "qkv + output projection")):  # vit's linear: the MLP's is common's
        if hasattr(vit, fn):
            patch(vit, fn, name)
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            if not isinstance(obj, type(vit)):
                delattr(obj, attr)  # back to the class's method
            else:
                setattr(obj, attr, old)


def _scope_of(ev: Any) -> str:
    """The innermost scope of an event; einsum (the relative-position bias) counts as one."""
    e = ev
    while e is not None:
        if e.name.startswith("scope:"):
            return e.name[6:]
        if e.name == "aten::einsum":
            return "relative-position bias (einsum)"
        e = e.cpu_parent
    return "encoder forward (pos embed add)"


def _fmt_table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sam_vit_b")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--slices", type=int, default=2, help="profiled forwards (after one warm-up)")
    p.add_argument("--rev", default=None, help="profile a git revision's nets/vit.py (default: this tree's)")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from napari_medsam._bench import bench_load, machine_info, real_slices
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.runtime import configure_runtime

    rt = configure_runtime(args.threads)
    info = machine_info()
    print(f"{info['cpu']}, torch {info['torch']} ({info['cpu_capability']}), load average "
          f"{_load()}; {rt.threads} thread(s); {args.model} {args.precision}")
    loaded, _ = bench_load(args.model)
    enc, vit = loaded.model.image_encoder, None
    if args.rev:
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_vit_ab import _like, _rev_module

        with tempfile.TemporaryDirectory() as tmp:
            vit = _rev_module(args.rev, "vit", Path(tmp), False)
        enc = _like(vit, enc)
        print(f"encoder: {args.rev}:src/napari_medsam/core/nets/vit.py")
    data = real_slices(1)
    x = torch.from_numpy(np.stack([VolumeEncoder(loaded, data.volume, axis=data.axis).model_input(data.indices[0])]))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def fwd() -> Any:
        with torch.inference_mode(), amp:
            return enc(x)

    fwd()  # warm-up (bf16 weight copies, allocator)
    cpu, faults = [], []
    for _ in range(args.slices):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
        fwd()
        cpu.append(time.thread_time() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(f"unprofiled: thread CPU {np.median(cpu):.3f} s/slice (median of {len(cpu)}: "
          f"{', '.join(f'{c:.3f}' for c in cpu)}), page faults {int(np.median(faults))} / slice")

    with scopes(enc, vit):
        fwd()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.thread_time()
            for _ in range(args.slices):
                fwd()
            prof_cpu = (time.thread_time() - t0) / args.slices
    table: dict[tuple[str, str], float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.name.startswith("scope:") or ev.name == "aten::einsum":
            continue
        # self time of the innermost aten op only: composite ops (matmul, linear, to, reshape) have
        # their kernels as children, so their own time is the dispatch around them
        table[(_scope_of(ev), _KIND_OF.get(ev.name, "other ops"))] += ev.self_cpu_time_total / 1e6 / args.slices
        per_op[ev.name] += ev.self_cpu_time_total / 1e6 / args.slices
    total = sum(table.values())
    by_scope: dict[str, float] = defaultdict(float)
    by_kind: dict[str, float] = defaultdict(float)
    for (s, k), v in table.items():
        by_scope[s] += v
        by_kind[k] += v
    print(f"\nprofiled: thread CPU {prof_cpu:.3f} s/slice, ops' own CPU time {total:.3f} s/slice "
          f"(the rest: Python and the profiler)\n")
    print(_fmt_table([(s, f"{v:.3f}", f"{v / total:.1%}") for s, v in sorted(by_scope.items(), key=lambda t: -t[1])],
                     ("part", "s/slice", "share")))
    print()
    print(_fmt_table([(k, f"{v:.3f}", f"{v / total:.1%}") for k, v in sorted(by_kind.items(), key=lambda t: -t[1])],
                     ("kind of op", "s/slice", "share")))
    print()
    print(_fmt_table([(s, k, f"{v:.3f}") for (s, k), v in sorted(table.items(), key=lambda t: -t[1]) if v >= 0.002],
                     ("part", "kind of op", "s/slice")))
    print()
    print(_fmt_table([(k, f"{v:.3f}") for k, v in sorted(per_op.items(), key=lambda t: -t[1])[:20]],
                     ("op (own time)", "s/slice")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
