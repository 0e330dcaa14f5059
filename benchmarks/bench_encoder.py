"""Encoder throughput: matmul peak, GFLOPs per slice, naive fp32 eager vs ours, mask agreement.

Prints the tables of docs/benchmarks.md, section Encoder (the same measuring code as
``napari-medsam bench --sections peak,encoder``)::

    python benchmarks/bench_encoder.py                      # LiteMedSAM, 4 real slices x 3 rounds
    python benchmarks/bench_encoder.py --models litemedsam,mobilesam --compile --out enc.json

Timings are interleaved (every variant once per round) and each ratio is the median of the
per-round ratios, so a machine shared with other jobs slows both sides of a ratio alike. Mask
agreement: IoU of the masks decoded from each variant's embeddings vs the naive fp32 ones, for
three box prompts (brain, left half, right half) on each of the MNI152 T1 slices used for timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="litemedsam")
    p.add_argument("--device", default="cpu")
    p.add_argument("--slices", type=int, default=4, help="real slices per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: core.speed.recommended_threads()")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--out", default=None, help="write the figures as JSON")
    args = p.parse_args(argv)

    from napari_medsam._bench import (
        bench_encoder,
        bench_threads,
        format_budget,
        format_table,
        machine_info,
        matmul_peak,
    )
    from napari_medsam.core.speed import configure_runtime, physical_cpus

    info = machine_info()
    rt = configure_runtime(args.threads)
    print(f"{info['cpu']}, torch {info['torch']} ({info['cpu_capability']}), load average {info['loadavg_1min']}; "
          f"{rt.threads} thread(s) (torch default {rt.previous_threads}), allocator tuned: {rt.allocator_tuned}")
    counts = sorted({rt.threads, physical_cpus()})
    peaks = [matmul_peak(dt, budget_s=3.0, threads=n) for n in counts for dt in ("fp32", "bf16")]
    print(format_table(peaks, [("dtype", "torch.mm", ""), ("threads", "threads", ""), ("gflops", "GFLOP/s", ".1f"),
                               ("size", "n x n", "")]))
    peak_of = {p["dtype"]: p["gflops"] for p in peaks if p["threads"] == rt.threads}  # each dtype's own peak
    out = {"machine": info, "peak": peaks, "encoder": []}
    for m in [s.strip() for s in args.models.split(",") if s.strip()]:
        r = bench_encoder(m, device=args.device, n_slices=args.slices, rounds=args.rounds, compile=args.compile,
                          int8=not args.no_int8, peak_gflops=peak_of["fp32"], peak_gflops_bf16=peak_of.get("bf16"),
                          default_threads=rt.previous_threads)
        out["encoder"].append(r)
        print(f"\n{m}: {r['gflops_per_slice']:.1f} GFLOPs/slice; IoU over {r['n_masks']} box masks vs {r['baseline']}")
        print(format_table(r["rows"], [("variant", "variant", ""), ("threads", "threads", ""),
                                       ("s_per_slice", "s/slice", ".3f"), ("x_shipped", "x naive shipped", ".2f"),
                                       ("x_same", "x naive same runtime", ".2f"), ("frac_peak", "of peak", ".0%"),
                                       ("peak_dtype", "peak of", ""),
                                       ("faults_per_slice", "page faults/slice", ".0f"),
                                       ("iou_mean", "IoU mean", ".4f"), ("iou_min", "IoU min", ".4f"),
                                       ("kept", "kept", "")]))
        if r.get("budget"):
            print("\nWhere the time goes (ours, torch.profiler):")
            print(format_budget(r["budget"]))
    out["threads"] = bench_threads(out["encoder"][0]["model"], device=args.device, rounds=args.rounds)
    print("\n" + format_table(out["threads"], [("threads", "threads", ""), ("s_per_slice", "s/slice", ".3f"),
                                               ("speedup", "x 1 thread", ".2f")]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
