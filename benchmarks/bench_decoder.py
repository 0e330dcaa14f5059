"""Decoder latency: prompt (one box) to mask on the slice grid, with the slice's embedding cached.

Prints the table of docs/benchmarks.md, section Decoder (same code as
``napari-medsam bench --sections decoder``)::

    python benchmarks/bench_decoder.py                  # LiteMedSAM, 4 MNI slices x 3 boxes x 10 repeats

Conditions: the reference decoder modules (SAM's formulation) and ours, interleaved in one run,
with the least mask IoU between them; and ours while a :class:`~napari_medsam.core.prefetch.Prefetcher`
embeds the neighbouring slices in the background (what happens while a user browses and clicks).
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
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-prefetch", action="store_true", help="skip the 'while prefetching' condition")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from napari_medsam._bench import bench_decoder, format_decoder, machine_info
    from napari_medsam.core.speed import configure_runtime

    info = machine_info()
    rt = configure_runtime(args.threads)
    print(f"{info['cpu']}, load average {info['loadavg_1min']}, {rt.threads} threads")
    out = []
    for m in [s.strip() for s in args.models.split(",") if s.strip()]:
        r = bench_decoder(m, device=args.device, repeats=args.repeats, n_slices=args.slices,
                          with_prefetch=not args.no_prefetch)
        out.append(r)
        print(f"\n{m}: prompt-to-mask, {r['prompt']}")
        print(format_decoder(r))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "decoder": out}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
