"""``napari-medsam bench``: print what this machine does (the harness is :mod:`napari_medsam._bench`)."""

from __future__ import annotations

import argparse

from .._bench import SECTIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure embedding throughput, decoder latency, head speed and peak memory",
        description="Print the figures of docs/benchmarks.md for this machine: matmul peak, encoder speed "
                    "(naive fp32 vs ours, mask IoU of every speed-up), decoder latency, heads, peak RSS.")
    p.add_argument("--models", default="litemedsam",
                   help="comma-separated models for the encoder and decoder sections (default litemedsam); "
                        "models whose weights are not here run with random weights (timings only)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer slices, rounds and a 24-slice memory run")
    p.add_argument("--out", default=None, metavar="FILE", help="also write all figures to FILE as JSON")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: one per physical core not already busy, see core.speed)")
    p.add_argument("--slices", type=int, default=None, help="real slices per encoder timing round (default 4)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compile time)")
    p.add_argument("--memory-slices", type=int, default=None,
                   help="slices of the 400-slice volume to embed in the memory run (default all 400; --quick 24)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._bench import run_bench

    return run_bench(args)
