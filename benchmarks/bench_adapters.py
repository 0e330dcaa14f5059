"""Box-prompt Dice of plain vs adapted LiteMedSAM (Med-SA adapters, LoRA) on MNI152 slices not trained on.

Data: the MNI152 2009 template shipped with nilearn (197 x 233 x 189, 1 mm); the structure is the
white matter (``--structure wm``: WM probability > GM probability where GM + WM > 0.5) or the
whole brain (``brain``: GM + WM > 0.5). For each plane (``--axes``: 1 coronal, 2 axial; array
axes of the NIfTI as nibabel reads it) and each k in ``--ks``, adapters + decoder are trained
(:func:`napari_medsam.core.adapt.train_adapters`, ``--steps`` steps of one slice each) on k
slices spread evenly through the structure, with boxes simulated from the labels (MedSAM's
jitter), and evaluated on ``--n-eval`` other slices spread through the structure (the same for
every k of a plane): each slice is prompted with the structure's tight bounding box, Dice pooled
over the evaluation slices, plus the mean per-slice Dice. Training times are wall-clock on this
machine with the stated torch thread count (and whatever else runs on it: the load average is printed).

    python benchmarks/bench_adapters.py --out /tmp/bench_adapters.md
    python benchmarks/bench_adapters.py --axes 1 --ks 1 --kinds medsa --steps 10   # quick look

Rows are written to ``--out`` as they finish.

``--heads cnn,linear`` also trains each prompt-free head kind on the same k slices twice, on the
frozen encoder's embeddings and on the adapted encoder's (``train --with-adapter``), and reports
its Dice on the same evaluation slices (pooled, no prompt): does adaptation help the heads too?

    python benchmarks/bench_adapters.py --axes 1 --ks 3 --kinds medsa --heads cnn,linear --out /tmp/heads.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def load_mni(structure: str) -> tuple[object, np.ndarray]:
    from nilearn import datasets

    from napari_medsam.io import read_image

    image = read_image(datasets.MNI152_FILE_PATH)
    gm = np.asarray(read_image(datasets.GM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    wm = np.asarray(read_image(datasets.WM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    brain = gm + wm > 0.5
    lab = (brain & (wm > gm)) if structure == "wm" else brain
    return image, lab.astype(np.uint8)


def spread(items: list[int], k: int) -> list[int]:
    pos = np.linspace(0, len(items) - 1, k + 2)[1:-1]
    return sorted({items[int(round(p))] for p in pos})


def slice_of(arr: np.ndarray, axis: int, i: int) -> np.ndarray:
    return np.take(arr, i, axis=axis)


def box_dice(encoder, labels: np.ndarray, slices: list[int]) -> tuple[float, float]:
    """(pooled Dice, mean per-slice Dice) of tight-box prompts on ``slices``."""
    from napari_medsam.core.segment import Prompt2D, box_of, segment_slice

    inter = total = 0
    per = []
    for z in slices:
        gt = slice_of(labels, encoder.axis, z) > 0
        m = segment_slice(encoder, z, [Prompt2D.from_box(box_of(gt))])[0].mask
        i, s = int((m & gt).sum()), int(m.sum() + gt.sum())
        inter, total = inter + i, total + s
        per.append(2 * i / s if s else 1.0)
    return 2 * inter / total, float(np.mean(per))


def head_dice(encoder, labels: np.ndarray, train: list[int], evals: list[int], kind: str,
              steps: int, threads: int) -> tuple[float, float]:
    """(pooled Dice on ``evals``, training seconds) of a ``kind`` head trained on ``train``."""
    from napari_medsam.core.finetune import TrainParams, collect_training_data, fine_tune
    from napari_medsam.core.infer import predict_slices
    from napari_medsam.core.progress import drain

    t0 = time.perf_counter()
    data = drain(collect_training_data(encoder, labels, train))
    head = drain(fine_tune(data, TrainParams(head=kind, max_steps=steps, threads=threads), loaded=encoder.loaded))
    secs = time.perf_counter() - t0
    pred = drain(predict_slices(encoder, head, slices=evals)).labels
    gt = np.take(labels, evals, axis=encoder.axis) > 0
    pm = np.take(pred, evals, axis=encoder.axis) > 0
    return 2 * int((pm & gt).sum()) / max(1, int(pm.sum() + gt.sum())), secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--structure", default="wm", choices=("wm", "brain"))
    ap.add_argument("--axes", default="1,2")
    ap.add_argument("--ks", default="1,3")
    ap.add_argument("--kinds", default="medsa,lora",
                    help="adapter kinds: medsa, lora, medsa+sd, medsa+hyp, decoder (the ablation: Med-SA adapters "
                         "left at zero, only the mask decoder trained)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--min-area", type=int, default=300, help="least structure pixels for a slice to count")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heads", default="", help="prompt-free head kinds to train on frozen and adapted embeddings")
    ap.add_argument("--head-steps", type=int, default=150)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from napari_medsam.core.adapt import (
        AdapterConfig,
        AdaptParams,
        adapted_encoder,
        parameter_counts,
        train_adapters,
    )
    from napari_medsam.core.build import load_model
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.progress import drain

    torch.set_num_threads(args.threads)
    base = load_model("litemedsam", device="cpu", precision="fp32")
    image, labels = load_mni(args.structure)
    lines = [
        (f"LiteMedSAM, fp32, CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, "
         f"{args.threads} thread(s), load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
         f"structure {args.structure}, {args.steps} steps of 1 slice, {args.n_eval} evaluation slices per plane"),
        "",
        "| plane | k | model | trainable params (share) | box Dice pooled | mean | train s | s per slice-step |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def flush() -> None:
        text = "\n".join(lines) + "\n"
        if args.out:
            Path(args.out).write_text(text)
        print(lines[-1], flush=True)

    flush()
    frozen: dict[tuple, tuple[float, float]] = {}
    head_lines = ["", "Prompt-free heads on the same k slices, Dice (pooled) on the same evaluation slices:", "",
                  ("| plane | k | head | adapter | Dice, frozen encoder | Dice, adapted encoder | train s frozen | "
                   "train s adapted |"), "|---|---|---|---|---|---|---|---|"]
    configs = {"medsa": AdapterConfig(), "lora": AdapterConfig(kind="lora", rank=4),
               "medsa+sd": AdapterConfig(sd_trans=True), "medsa+hyp": AdapterConfig(hyp=True),
               "decoder": AdapterConfig()}
    for axis in (int(a) for a in args.axes.split(",")):
        plane = {0: "sagittal", 1: "coronal", 2: "axial"}[axis]
        enc = VolumeEncoder(base, image, axis=axis)
        area = (labels > 0).sum(axis=tuple(i for i in range(3) if i != axis))
        inside = [int(i) for i in np.flatnonzero(area >= args.min_area)]
        ks = [int(k) for k in args.ks.split(",")]
        train_sets = {k: spread(inside, k) for k in ks}
        used = set().union(*train_sets.values())
        pool = [i for i in inside if i not in used]
        evals = spread(pool, args.n_eval)
        d0, m0 = box_dice(enc, labels, evals)
        lines.append(f"| {plane} | - | plain | 0 | {d0:.3f} | {m0:.3f} | - | - |")
        flush()
        for k in ks:
            for kind in args.kinds.split(","):
                cfg = configs[kind]
                params = AdaptParams(steps=args.steps, batch_size=1, threads=args.threads,
                                     lr=0.0 if kind == "decoder" else AdaptParams.lr)
                t0 = time.perf_counter()
                trained = drain(train_adapters(enc, labels, train_sets[k], config=cfg, params=params))
                secs = time.perf_counter() - t0
                c = parameter_counts(trained.loaded)
                d, m = box_dice(adapted_encoder(enc, trained.loaded), labels, evals)
                h = trained.meta.history
                tag = "decoder only" if kind == "decoder" else cfg.tag
                n_ad = 0 if kind == "decoder" else c["adapter"]
                trainable = c["decoder"] + n_ad
                lines.append(f"| {plane} | {k} | {tag} | {trainable:,} ({100 * trainable / c['total']:.1f} %; adapters "
                             f"{n_ad:,}) | {d:.3f} | {m:.3f} | {secs:.0f} | {h['seconds_per_slice_step']:.2f} |")
                flush()
                for hk in (h for h in args.heads.split(",") if h):
                    if (axis, k, hk) not in frozen:
                        frozen[axis, k, hk] = head_dice(enc, labels, train_sets[k], evals, hk, args.head_steps,
                                                        args.threads)
                    fd, fs = frozen[axis, k, hk]
                    ad, as_ = head_dice(adapted_encoder(enc, trained.loaded), labels, train_sets[k], evals, hk,
                                        args.head_steps, args.threads)
                    head_lines.append(f"| {plane} | {k} | {hk} | {tag} | {fd:.3f} | {ad:.3f} | {fs:.0f} | {as_:.0f} |")
                    print(head_lines[-1], flush=True)
    if args.heads:
        lines.extend(head_lines)
    lines.append("")
    lines.append(f"load average at the end {os.getloadavg()[0]:.1f}; command: python {' '.join(sys.argv)}")
    flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
