"""Head training and whole-volume prediction speed, with the held-out Dice of the same run (issue 16 item 4).

    python benchmarks/bench_head_speed.py --cache-dir /tmp/s16/cache
    python benchmarks/bench_head_speed.py --cache-dir /tmp/s16/cache --variants fp32,auto --rounds 3
    python benchmarks/bench_head_speed.py --cache-dir /tmp/s16/cache --baseline-src /tmp/s16/base/src
    python benchmarks/bench_head_speed.py --cache-dir /tmp/s16/cache --profile

Data: the MNI152 template and its GM / WM labels (``bench_heads.load_mni``); a slab of 61 slices
along ``--axis`` (coronal by default) around the middle of the brain, 24 of them labelled (spread
through the slab as in ``bench_gui.py``'s Fine-tune figure), the other 37 held out for the Dice.
LiteMedSAM embeds the 61 slices first (cached in ``--cache-dir``; untimed) at ``--precision``
(auto: bf16 where the CPU has native bf16, as the Model dock does).

Per variant and round: (a) ``fine_tune`` of the default cnn head with the Fine-tune dock's default
``TrainParams`` (only ``seed`` and ``threads`` set, plus the variant's ``precision``), wall and
process CPU seconds, steps and why it stopped; (b) ``predict_slices`` over the 61 cached slices,
the median of ``--predict-repeats`` passes in ms/slice; (c) the Dice per class on the 37 held-out
slices. Variants: ``auto`` / ``fp32`` / ``bf16`` (the heads' precision, where the code has the
option), ``baseline`` (the same measurement in a child process importing ``napari_medsam`` from
``--baseline-src``, e.g. a ``git worktree`` of the commit before a change). Rounds interleave the
variants, so both sides of a ratio see the same load; a ratio is the first variant's time over the
variant's (a speed-up), the median over rounds, of the process CPU time (with 1 thread the measure
others' load skews least; wall time is printed beside it). Prints CPU flags, threads and load.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_SLAB, N_TRAIN = 61, 24


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    flags = sorted(set(re.findall(r"\b(avx2|avx512_bf16|amx_bf16|avx512f)\b", text)))
    return " ".join(flags) or "none of avx2/avx512"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def slab_split(labels: np.ndarray, axis: int) -> tuple[list[int], list[int], list[int]]:
    """The 61-slice slab around the middle of the brain, its 24 training and 37 held-out slices."""
    lab = np.moveaxis(labels, axis, 0)
    brain = [i for i in range(lab.shape[0]) if lab[i].any()]
    mid = brain[len(brain) // 2]
    slab = list(range(mid - N_SLAB // 2, mid - N_SLAB // 2 + N_SLAB))
    train = [slab[int(z)] for z in np.linspace(2, N_SLAB - 3, N_TRAIN).round()]
    held = [s for s in slab if s not in train]
    return slab, train, held


def setup(args: argparse.Namespace):
    sys.path.insert(0, str(HERE))
    import torch
    from bench_heads import load_mni

    from napari_medsam.core.build import load_model
    from napari_medsam.core.embeddings import EmbeddingCache
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.progress import drain

    torch.set_num_threads(args.threads)
    image, labels = load_mni()
    slab, train, held = slab_split(labels, args.axis)
    loaded = load_model("litemedsam", device="cpu", precision=args.precision)
    enc = VolumeEncoder(loaded, image, axis=args.axis, cache=EmbeddingCache(args.cache_dir))
    drain(enc.embed(slab))
    return loaded, enc, labels, slab, train, held


def measure(args: argparse.Namespace, state, precision: str | None) -> dict:
    """One training + prediction run of the default cnn head; ``precision``: TrainParams/predict option."""
    from bench_heads import dice_per_class

    from napari_medsam.core.finetune import TrainParams, collect_training_data, fine_tune
    from napari_medsam.core.infer import predict_slices
    from napari_medsam.core.progress import drain

    loaded, enc, labels, slab, train, held = state
    t0 = time.perf_counter()
    data = drain(collect_training_data(enc, labels, train))
    collect_s = time.perf_counter() - t0
    kw = {"seed": args.seed, "threads": args.threads}
    names = {f.name for f in dataclasses.fields(TrainParams)}
    if precision is not None and "precision" in names:
        kw["precision"] = precision
    params = TrainParams(**kw)
    c0, t0 = time.process_time(), time.perf_counter()
    head = drain(fine_tune(data, params, loaded=loaded, class_names=("GM", "WM")))
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    pkw = {}
    if precision is not None and "precision" in inspect.signature(predict_slices).parameters:
        pkw["precision"] = precision
    times, cpu, res = [], [], None
    for _ in range(args.predict_repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        res = drain(predict_slices(enc, head, slices=slab, **pkw))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    pred = np.moveaxis(res.labels, args.axis, 0)[held]
    truth = np.moveaxis(labels, args.axis, 0)[held]
    d = dice_per_class(pred, truth, (1, 2))
    h = head.meta.history
    return {"train_s": train_s, "train_cpu_s": train_cpu, "steps": h["steps"], "stopped": h["stopped"],
            "collect_s": collect_s, "predict_ms": 1000 * float(np.median(times)) / len(slab),
            "predict_cpu_ms": 1000 * float(np.median(cpu)) / len(slab),
            "predict_ms_all": [round(1000 * t / len(slab), 1) for t in times],
            "dice_gm": d[0], "dice_wm": d[1], "dice": float(np.mean(d)),
            "precision": h.get("precision", "fp32 (not recorded)")}


def run_baseline(args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(args.baseline_src).resolve()))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--cache-dir", str(args.cache_dir),
           "--threads", str(args.threads), "--axis", str(args.axis), "--seed", str(args.seed),
           "--precision", args.precision, "--predict-repeats", str(args.predict_repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"baseline child failed:\n{out.stderr[-3000:]}")


def profile(args: argparse.Namespace, state) -> None:
    """torch.profiler op table of 30 training steps and of one prediction pass over the slab."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from napari_medsam.core.finetune import TrainParams, collect_training_data, fine_tune
    from napari_medsam.core.infer import predict_slices
    from napari_medsam.core.progress import drain

    loaded, enc, labels, slab, train, held = state
    data = drain(collect_training_data(enc, labels, train))
    kw = {"precision": args.profile_precision} if args.profile_precision else {}
    params = TrainParams(seed=args.seed, threads=args.threads, max_steps=30, patience=0, **kw)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        head = drain(fine_tune(data, params, loaded=loaded))
        print(f"# profiled training, 30 steps: {time.perf_counter() - t0:.2f} s (profiler on)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        drain(predict_slices(enc, head, slices=slab, **kw))
        print(f"# profiled prediction, {len(slab)} slices: {time.perf_counter() - t0:.2f} s (profiler on)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=None, help="embedding cache folder (default: the user cache)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training and prediction (default 1)")
    ap.add_argument("--axis", type=int, default=1, choices=(0, 1, 2), help="0 sagittal, 1 coronal (default), 2 axial")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", help="LiteMedSAM's precision for the embeddings (default auto)")
    ap.add_argument("--variants", default="auto",
                    help="comma-separated: auto, fp32, bf16 (the heads' precision), baseline (needs --baseline-src)")
    ap.add_argument("--baseline-src", default=None, help="a src/ folder holding the napari_medsam to compare with")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--predict-repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables instead")
    ap.add_argument("--profile-precision", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    state = setup(args)
    if args.child:
        print(json.dumps(measure(args, state, None)), flush=True)
        return 0
    print(f"# CPU flags: {cpu_flags()}; {os.cpu_count()} cores; torch {torch.__version__} on {platform.machine()}, "
          f"{args.threads} thread(s); LiteMedSAM {args.precision} -> compute id {state[0].compute_id.split('|')[-1]}; "
          f"load average {loadavg()}", flush=True)
    slab, train, held = state[3:]
    print(f"# axis {args.axis}, slab {slab[0]}..{slab[-1]} ({len(slab)} slices), {len(train)} labelled, "
          f"{len(held)} held out", flush=True)
    if args.profile:
        profile(args, state)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "baseline" in variants and not args.baseline_src:
        ap.error("the baseline variant needs --baseline-src")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            res = run_baseline(args) if v == "baseline" else measure(args, state, v)
            results[v].append(res)
            print(f"round {r} {v}: " + json.dumps({k: (round(x, 4) if isinstance(x, float) else x)
                                                    for k, x in res.items()}) + f"; load {loadavg()}", flush=True)
    ref = variants[0]
    print()
    # with 1 thread the process CPU time is the measure that others' load skews least; wall time beside it
    print(f"ratios: {ref} / variant, median over rounds")
    print("| variant | precision | train s wall | train s CPU | steps | stopped | train speed-up (CPU) | "
          "predict ms/slice wall | predict ms/slice CPU | predict speed-up (CPU) | held-out Dice GM / WM / mean |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        rs = results[v]
        tr = [b["train_cpu_s"] / a["train_cpu_s"] for a, b in zip(rs, results[ref], strict=True)]
        pr = [b["predict_cpu_ms"] / a["predict_cpu_ms"] for a, b in zip(rs, results[ref], strict=True)]
        dice = " ; ".join(f"{a['dice_gm']:.4f} / {a['dice_wm']:.4f} / {a['dice']:.4f}" for a in rs[:1])
        print(f"| {v} | {rs[0]['precision']} | {np.median([a['train_s'] for a in rs]):.1f} | "
              f"{np.median([a['train_cpu_s'] for a in rs]):.1f} | {rs[0]['steps']} | {rs[0]['stopped']} | "
              f"{np.median(tr):.2f}x | {np.median([a['predict_ms'] for a in rs]):.1f} | "
              f"{np.median([a['predict_cpu_ms'] for a in rs]):.1f} | {np.median(pr):.2f}x | {dice} |")
    print(f"# load average at the end {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
