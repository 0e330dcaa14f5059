"""Peak memory: embed and annotate a 400 x 512 x 512 int16 CT-like volume in a fresh process.

Writes a synthetic abdomen-like CT (body, muscle wall, spine, lungs, an ellipsoidal organ; int16
HU with noise) as ``.npy`` to a temporary folder, then runs, in a fresh Python process, exactly
what a user runs::

    napari-medsam embed VOLUME.npy --window soft_tissue --slices Z0-Z1 --cache-dir TMP
    napari-medsam segment VOLUME.npy --box Z,R0,C0,R1,C1 --propagate -o labels.nii.gz ...

The volume is read lazily (a memory map), embeddings go to the fp16 disk cache through the
byte-bounded RAM LRU, and the label array is the only full-size array allocated. Reports the
process's peak RSS (``getrusage``) and per-phase peaks sampled every 20 ms (psutil)::

    python benchmarks/bench_memory.py                  # all 400 slices (tens of minutes on 2 cores)
    python benchmarks/bench_memory.py --slices 24      # a quick run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--device", default="cpu")
    p.add_argument("--slices", type=int, default=None, help="slices to embed (default all 400)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None, help="keep the volume, cache and labels here (default: a temp dir, removed)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from napari_medsam._bench import MEMORY_SHAPE, bench_memory, format_table

    r = bench_memory(args.model, device=args.device, slices=args.slices, workdir=args.workdir, threads=args.threads)
    if "error" in r:
        print(r["error"], file=sys.stderr)
        return 1
    print(f"{MEMORY_SHAPE} int16 ({r['volume_mb']:.0f} MiB), {r['embedded_slices']} slices embedded in "
          f"{r['embed_s']:.0f} s, one box propagated in {r['annotate_s']:.0f} s")
    rows = [{"phase": k, "mb": v} for k, v in r["phase_peak_mb"].items() if k != "between"]
    rows.append({"phase": "process peak (ru_maxrss)", "mb": r["peak_rss_mb"]})
    print(format_table(rows, [("phase", "phase", ""), ("mb", "peak RSS MiB", ".0f")]))
    for line in r["cli_output"]:
        print("  " + line)
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
