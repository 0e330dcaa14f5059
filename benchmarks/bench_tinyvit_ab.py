"""LiteMedSAM (TinyViT) bf16 encoder on a CPU: time budget by op kind, A/B of tiny_vit.py's bf16 flags.

Real LiteMedSAM weights where present (random otherwise: timings only), real MNI152 T1 slices::

    OMP_NUM_THREADS=1 python benchmarks/bench_tinyvit_ab.py --budget            # profiler, by op kind
    OMP_NUM_THREADS=1 python benchmarks/bench_tinyvit_ab.py --ab BF16_SOFTMAX=1 FOLDED_BIAS_WINDOWS=4

``--ab``: each variant sets tiny_vit module flags (NAME=VALUE, comma-joined within one variant);
the baseline is the flags as shipped. Rounds interleave the variants; each forward's
``time.thread_time`` is taken, and every variant's ratio to the baseline is the median of the
per-round ratios. The bf16 box-mask IoU vs our fp32 encoder is printed for each variant.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", action="store_true")
    p.add_argument("--ab", nargs="*", default=[])
    args = p.parse_args()

    import dataclasses

    import numpy as np
    import torch

    from napari_medsam._bench import _iou, bench_load, masks_from, real_slices
    from napari_medsam.core.encoder import VolumeEncoder, run_encoder
    from napari_medsam.core.nets import tiny_vit
    from napari_medsam.core.speed import configure_runtime

    rt = configure_runtime(args.threads)  # threads and the tuned allocator, as the app and bench_encoder run
    loaded, real = bench_load("litemedsam")
    bf = dataclasses.replace(loaded, dtype=torch.bfloat16)
    data = real_slices(args.slices)
    ve = VolumeEncoder(loaded, data.volume, axis=data.axis)
    tf = ve.transform()
    inputs = torch.from_numpy(np.stack([ve.model_input(k) for k in data.indices]))
    print(f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; threads {torch.get_num_threads()};"
          f" allocator tuned {rt.allocator_tuned}; real weights {real}; {len(data.indices)} slices")

    def enc(lo):
        return lambda x: run_encoder(lo, x.numpy())

    if args.budget:
        from torch.profiler import ProfilerActivity, profile
        with torch.inference_mode():
            enc(bf)(inputs[:1])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for j in range(len(inputs)):
                    enc(bf)(inputs[j:j + 1])
        rows = []
        total = 0.0
        for e in prof.key_averages():
            t = e.self_cpu_time_total / 1e6 / len(inputs)
            total += t
            rows.append((t, e.key, e.count // len(inputs)))
        for t, k, c in sorted(rows, reverse=True)[:25]:
            print(f"  {k:55s} {t * 1e3:8.1f} ms/slice {100 * t / total:5.1f} %  {c} calls")
        print(f"  total self CPU {total * 1e3:.1f} ms/slice")
        return 0

    def setf(spec):
        old = {}
        for kv in filter(None, spec.split(",")):
            k, v = kv.split("=")
            old[k] = getattr(tiny_vit, k)
            setattr(tiny_vit, k, type(old[k])(int(v)) if not isinstance(old[k], float) else float(v))
        return old

    variants = ["", *args.ab]
    with torch.inference_mode():
        ref = masks_from(enc(loaded), loaded, data, inputs, tf)
    for spec in variants:
        old = setf(spec)
        with torch.inference_mode():
            m = masks_from(enc(bf), bf, data, inputs, tf)
        for k, v in old.items():
            setattr(tiny_vit, k, v)
        ious = [_iou(a, b) for a, b in zip(ref, m, strict=True)]
        print(f"  IoU bf16 vs fp32 [{spec or 'shipped'}]: mean {np.mean(ious):.4f} min {np.min(ious):.4f} over {len(ious)}")
    times = {s: [] for s in variants}
    for _ in range(args.rounds):
        for spec in variants:
            old = setf(spec)
            t = 0.0
            with torch.inference_mode():
                enc(bf)(inputs[:1])  # warm (kept buffers of this variant)
                for j in range(len(inputs)):
                    t0 = time.thread_time()
                    enc(bf)(inputs[j:j + 1])
                    t += time.thread_time() - t0
            times[spec].append(t / len(inputs))
            for k, v in old.items():
                setattr(tiny_vit, k, v)
    base = times[""]
    for spec in variants:
        r = sorted(b / t for b, t in zip(base, times[spec], strict=True))
        print(f"  [{spec or 'shipped'}] thread CPU {np.median(times[spec]):.4f} s/slice; baseline/this {r[len(r) // 2]:.3f}"
              f" (rounds {' '.join(f'{x:.3f}' for x in r)})")
    print(f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
