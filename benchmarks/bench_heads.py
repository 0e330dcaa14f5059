"""Few-shot prompt-free heads on frozen LiteMedSAM embeddings vs a UNet trained from scratch.

Data: the MNI152 2009 template shipped with nilearn (197 x 233 x 189, 1 mm). Labels: 0 background,
1 grey matter, 2 white matter: the argmax of nilearn's GM / WM probability maps where GM + WM > 0.5.
Slices: coronal by default, i.e. array axis 1 of the NIfTI as nibabel reads it (``--axis 2``: axial,
``--axis 0``: sagittal). For k = 1, 3, 5, 10 labelled slices spread evenly through the brain, every
head is trained on those slices' cached embeddings and evaluated on all other brain slices, or on
every n-th brain slice with ``--eval-every n`` (Dice per class, pooled over the evaluation slices;
only the training and evaluation slices are embedded), next
to a small UNet trained from scratch on the same slices' images with the same loss, augmentation
policy and stopping rule. Training times are wall-clock seconds on this machine with the stated
thread count, and for the heads also the process CPU seconds of the training (with 1 thread the
better measure on a shared machine: others' load inflates the wall time); the embedding time of the
labelled slices is reported apart (heads need it, the UNet does not; a napari session has usually
computed it already for prompting).

Prints a markdown table and writes it to ``--out``::

    python benchmarks/bench_heads.py --out docs/bench_heads.md \
        --cache-dir /tmp/medsam-dev-cache/embeddings
    python benchmarks/bench_heads.py --axis 2 --eval-every 3 --ks 1,3 \
        --cache-dir /tmp/medsam-dev-cache/embeddings

Heads use their general defaults (``TrainParams()``); the rows ``cnn no-image``, ``cnn no-aug``,
``cnn +flips`` and ``cnn 32-cell windows`` are ablations of the cnn head's image skips, its
augmentation and its training-window size (32 cells: the default before 3/8 of the grid, 24);
``cnn edge windows`` and ``hsam edge windows`` draw the windows' starts with a margin of half a window
(``TrainParams.crop_margin=0.5``), so that they reach the grid's edges about 1 time in 5;
``hsam no-mask-attention`` switches off, ``hsam +masa``, ``hsam +hierarchical`` and
``hsam 2-layer stage 2`` switch on, one part of H-SAM's decoder each (the hsam default has mask
attention only and one stage-2 layer); ``hsam all parts`` is H-SAM's full decoder. Ablations run at ``--ablation-ks`` only. ``--seeds 0,1,2`` trains every
head once per seed and adds a table of the seed spread (mean, min - max of the mean Dice, mean
training time and its ratio to the cnn head's at the same k); every row names its trainable
parameter count. ``--save-masks DIR`` keeps each run's predictions for
``benchmarks/plot_head_masks.py``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def load_mni() -> tuple[object, np.ndarray]:
    from nilearn import datasets

    from napari_medsam.io import read_image

    image = read_image(datasets.MNI152_FILE_PATH)
    gm = np.asarray(read_image(datasets.GM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    wm = np.asarray(read_image(datasets.WM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    labels = np.where(gm + wm > 0.5, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    return image, labels


def spread(brain: list[int], k: int) -> list[int]:
    """``k`` slices evenly spread through the brain (the outermost, nearly empty slices excluded)."""
    pos = np.linspace(0, len(brain) - 1, k + 2)[1:-1]
    return sorted({brain[int(round(p))] for p in pos})


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes: tuple[int, ...]) -> list[float]:
    out = []
    for c in classes:
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        out.append(float(2.0 * (p & t).sum() / denom) if denom else 1.0)
    return out


# ------------------------------------------------------------------------------------------------
# the baseline: a small UNet from scratch on the raw slices


class UNet(nn.Module):
    """Four levels (16, 32, 64, 128 channels), two 3x3 conv + GroupNorm + ReLU per level."""

    def __init__(self, in_ch: int = 1, num_classes: int = 3, base: int = 16) -> None:
        super().__init__()
        chs = [base * 2**i for i in range(4)]

        def block(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.GroupNorm(8, b), nn.ReLU(inplace=True),
                                 nn.Conv2d(b, b, 3, padding=1, bias=False), nn.GroupNorm(8, b), nn.ReLU(inplace=True))

        self.down = nn.ModuleList([block(in_ch, chs[0])] + [block(chs[i - 1], chs[i]) for i in range(1, 4)])
        self.up = nn.ModuleList(nn.ConvTranspose2d(chs[i], chs[i - 1], 2, stride=2) for i in range(3, 0, -1))
        self.dec = nn.ModuleList(block(2 * chs[i - 1], chs[i - 1]) for i in range(3, 0, -1))
        self.out = nn.Conv2d(chs[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.out(x)


def _pad16(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[-2:]
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, -h % 16), (0, -w % 16)])


def train_unet(images: np.ndarray, labels: np.ndarray, *, max_steps: int, patience: int, seed: int,
               batch_size: int = 4, lr: float = 1e-3, augment: bool = True) -> tuple[nn.Module, float, int]:
    """Train from scratch on ``(N, H, W)`` images in [0, 1] and labels.

    Same loss, batch rule, step-budget and plateau rule as the heads; pixel-level flips of both
    axes and shifts of up to 8 px (for a network on pixels flips are exact).
    """
    from napari_medsam.core.finetune import segmentation_loss

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    x_all = torch.from_numpy(_pad16(images)[:, None].astype(np.float32))
    onehot = np.stack([labels == c for c in range(3)], axis=1).astype(np.float32)
    t_all = torch.from_numpy(_pad16(onehot))  # padding: all-zero targets, ignored by the loss
    net = UNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    bs = min(batch_size, n)
    steps_per_epoch = max(1, math.ceil(n / bs))
    epochs = max(1, math.ceil(max_steps / steps_per_epoch))
    best, ema, wait, reduced, step = math.inf, None, 0, False, 0
    t0 = time.perf_counter()
    net.train()
    for _epoch in range(epochs):
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(steps_per_epoch * bs / n))])
        total = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * bs:(s + 1) * bs]
            x, t = x_all[idx].clone(), t_all[idx].clone()
            if augment:
                for j in range(len(idx)):
                    for dim in (-2, -1):
                        if bool(torch.rand((), generator=gen) < 0.5):
                            x[j], t[j] = torch.flip(x[j], (dim,)), torch.flip(t[j], (dim,))
                    dy, dx = (int(v) for v in torch.randint(-8, 9, (2,), generator=gen))
                    x[j], t[j] = torch.roll(x[j], (dy, dx), (-2, -1)), torch.roll(t[j], (dy, dx), (-2, -1))
            warm = min(1.0, (step + 1) / 10)
            for g in opt.param_groups:
                g["lr"] = lr * warm
            loss = segmentation_loss(net(x), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total += float(loss.detach())
        total /= steps_per_epoch
        ema = total if ema is None else 0.7 * ema + 0.3 * total
        if ema < best * 0.99:
            best, wait = ema, 0
        else:
            wait += 1
        if patience > 0:
            if wait >= max(1, patience // 2) and not reduced:
                lr, reduced, wait = lr / 3.0, True, 0
            elif wait >= patience:
                break
    net.eval()
    return net, time.perf_counter() - t0, step


def predict_unet(net: nn.Module, images: np.ndarray) -> np.ndarray:
    h, w = images.shape[-2:]
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), 8):
            x = torch.from_numpy(_pad16(images[start:start + 8])[:, None].astype(np.float32))
            out.append(net(x)[..., :h, :w].argmax(1).numpy().astype(np.uint8))
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------


VARIANTS = {
    # name: (head kind, head config, TrainParams overrides)
    "linear": ("linear", {}, {}),
    "cnn": ("cnn", {}, {}),
    "cnn no-image": ("cnn", {"image_skip": False}, {}),
    "cnn no-aug": ("cnn", {}, {"augment": False}),
    "cnn +flips": ("cnn", {}, {"flip": True}),
    "cnn 32-cell windows": ("cnn", {}, {"crop": 32}),
    "cnn edge windows": ("cnn", {}, {"crop_margin": 0.5}),
    "autosam": ("autosam", {}, {}),
    "hsam": ("hsam", {}, {}),
    "hsam no-mask-attention": ("hsam", {"mask_attention": False}, {}),
    "hsam +masa": ("hsam", {"masa": True}, {}),
    "hsam +hierarchical": ("hsam", {"hierarchical": True}, {}),
    "hsam 2-layer stage 2": ("hsam", {"stage2_layers": 2}, {}),
    "hsam all parts": ("hsam", {"masa": True, "hierarchical": True, "stage2_layers": 2}, {}),
    "hsam edge windows": ("hsam", {}, {"crop_margin": 0.5}),
    "selfprompt": ("selfprompt", {}, {}),
}
#: the prefixes of ablation rows (run at --ablation-ks only)
ABLATIONS = ("cnn ", "hsam ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--ks", default="1,3,5,10", help="numbers of labelled slices")
    ap.add_argument("--heads", default=",".join(VARIANTS), help=f"heads to train, from: {', '.join(VARIANTS)}")
    ap.add_argument("--autosam-ks", default="1,3",
                    help="the k at which to train the (slow on CPU) autosam head (default 1,3; 'all')")
    ap.add_argument("--ablation-ks", default="1,3",
                    help="the k at which to run the cnn ablations (default 1,3; 'all')")
    ap.add_argument("--cache-dir", default=None, help="embedding cache folder (default: the user cache)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="comma-separated seeds, one row per head and seed (default: --seed)")
    ap.add_argument("--axis", type=int, default=1, choices=(0, 1, 2),
                    help="slicing axis of the MNI array: 0 sagittal, 1 coronal (default), 2 axial")
    ap.add_argument("--eval-every", type=int, default=1,
                    help="evaluate on every n-th brain slice (default 1: all); only those are embedded")
    ap.add_argument("--no-unet", action="store_true", help="skip the scratch UNet baseline")
    ap.add_argument("--save-masks", type=Path, default=None,
                    help="write each run's predicted and true labels of the evaluation slices here (.npz)")
    ap.add_argument("--unet-steps", type=int, default=300, help="step budget of the scratch UNet (default 300)")
    ap.add_argument("--head-precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="TrainParams.precision and predict_slices' of the heads (default auto: as LiteMedSAM, fp32 here)")
    ap.add_argument("--predict-precision", default=None, choices=("auto", "fp32", "bf16"),
                    help="predict_slices' precision apart (default: --head-precision)")
    args = ap.parse_args(argv)

    from napari_medsam.core.build import load_model
    from napari_medsam.core.embeddings import EmbeddingCache
    from napari_medsam.core.encoder import VolumeEncoder, run_encoder
    from napari_medsam.core.finetune import TrainParams, collect_training_data, fine_tune
    from napari_medsam.core.infer import predict_slices
    from napari_medsam.core.progress import drain

    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    for h in heads:
        if h not in VARIANTS:
            ap.error(f"unknown head {h!r}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    autosam_ks = ks if args.autosam_ks == "all" else [int(k) for k in args.autosam_ks.split(",") if k]
    ablation_ks = ks if args.ablation_ks == "all" else [int(k) for k in args.ablation_ks.split(",") if k]
    image, labels = load_mni()
    axis = args.axis
    plane_name = {0: "sagittal", 1: "coronal", 2: "axial"}[axis]
    if args.eval_every < 1:
        ap.error("--eval-every must be at least 1")
    lab_sl = np.moveaxis(labels, axis, 0)
    brain = [i for i in range(lab_sl.shape[0]) if lab_sl[i].any()]
    splits = {}
    for k in ks:
        train = spread(brain, k)
        splits[k] = (train, [i for i in brain[::args.eval_every] if i not in train])
    loaded = load_model("litemedsam", device="cpu", precision="fp32")
    enc = VolumeEncoder(loaded, image, axis=axis, cache=EmbeddingCache(args.cache_dir))
    drain(enc.embed(sorted({i for tr, ev in splits.values() for i in tr + ev})))
    # the encoder's own cost per slice, measured uncached on three slices
    t0 = time.perf_counter()
    for i in brain[len(brain) // 2:len(brain) // 2 + 3]:
        run_encoder(loaded, enc.model_input(i)[None])
    embed_s = (time.perf_counter() - t0) / 3
    raw = np.moveaxis(np.asarray(image.data[...], np.float32) / 255.0, axis, 0)  # coronal: (233, 197, 189)
    rows = []
    for k in ks:
        train, evals = splits[k]
        truth = lab_sl[evals]
        data = drain(collect_training_data(enc, labels, train))
        for name in heads:
            kind, cfg, over = VARIANTS[name]
            if (kind == "autosam" and k not in autosam_ks) or (name.startswith(ABLATIONS) and k not in ablation_ks):
                continue
            for seed in seeds:
                prec = {} if args.head_precision == "auto" else {"precision": args.head_precision}
                pp = args.predict_precision or args.head_precision
                pprec = {} if pp == "auto" else {"precision": pp}
                params = TrainParams(head=kind, head_config=cfg, seed=seed, threads=0, **over, **prec)
                cpu0 = time.process_time()  # 1 thread: the training's CPU time, which others' load skews less
                head = drain(fine_tune(data, params, loaded=loaded, class_names=("GM", "WM")))
                cpu = time.process_time() - cpu0
                res = drain(predict_slices(enc, head, slices=evals, **pprec))
                pred = np.moveaxis(res.labels, axis, 0)[evals]
                d = dice_per_class(pred, truth, (1, 2))
                h = head.meta.history
                n_par = sum(p.numel() for p in head.module.parameters())
                rows.append((k, name, seed, d[0], d[1], float(np.mean(d)), h["seconds"], h["steps"], k * embed_s,
                             n_par, cpu))
                print(rows[-1], file=sys.stderr, flush=True)
                if args.save_masks is not None:
                    args.save_masks.mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(args.save_masks / f"{plane_name}_k{k}_{name.replace(' ', '_')}_s{seed}.npz",
                                        pred=pred.astype(np.uint8), truth=truth.astype(np.uint8),
                                        image=raw[evals].astype(np.float16), slices=np.asarray(evals))
        if not args.no_unet:
            net, secs, steps = train_unet(raw[train], lab_sl[train], max_steps=args.unet_steps, patience=15,
                                          seed=args.seed)
            pred = predict_unet(net, raw[evals])
            d = dice_per_class(pred, truth, (1, 2))
            rows.append((k, "unet (scratch)", args.seed, d[0], d[1], float(np.mean(d)), secs, steps, None,
                         sum(p.numel() for p in net.parameters()), None))
            print(rows[-1], file=sys.stderr, flush=True)
    plane = {0: "sagittal", 1: "coronal", 2: "axial"}[axis]
    evaluated = ("all other brain slices" if args.eval_every == 1 else
                 f"every {args.eval_every}-th brain slice ({len(brain[::args.eval_every])}), training slices excluded")
    header = (f"MNI152 2009 template (nilearn), GM/WM, {plane} slices (array axis {axis}), {len(brain)} brain slices, "
              f"evaluated on {evaluated}; "
              f"LiteMedSAM fp32 embeddings ({embed_s:.2f} s/slice to embed), heads {args.head_precision} "
              f"(prediction {args.predict_precision or args.head_precision}); "
              f"torch {torch.__version__}, "
              f"{args.threads} thread(s) on {platform.machine()}; seeds {','.join(map(str, seeds))}; "
              f"scratch UNet budget {args.unet_steps} steps")
    lines = [
        header, "",
        ("| k | method | seed | Dice GM | Dice WM | mean Dice | train (s) | train CPU (s) | steps | + embed k slices (s) "
         "| trainable params |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, name, seed, g, w, m, s, steps, e, n_par, cpu in rows:
        emb = "-" if e is None else f"{e:.1f}"
        cpu_text = "-" if cpu is None else f"{cpu:.1f}"
        lines.append(f"| {k} | {name} | {seed} | {g:.3f} | {w:.3f} | {m:.3f} | {s:.1f} | {cpu_text} | {steps} | {emb} "
                     f"| {n_par:,} |")
    if len(seeds) > 1:  # the seed spread: mean and range of the mean Dice, mean training time
        lines += ["", "| k | method | seeds | mean Dice (mean) | min - max | train (s, mean) | x cnn time |",
                  "|---|---|---|---|---|---|---|"]
        groups: dict[tuple[int, str], list[tuple]] = {}
        for r in rows:
            groups.setdefault((r[0], r[1]), []).append(r)
        for (k, name), rs in groups.items():
            md, secs = [r[5] for r in rs], float(np.mean([r[6] for r in rs]))
            cnn = groups.get((k, "cnn"))
            ratio = f"{secs / float(np.mean([r[6] for r in cnn])):.2f}" if cnn else "-"
            lines.append(f"| {k} | {name} | {len(rs)} | {np.mean(md):.3f} | {min(md):.3f} - {max(md):.3f} | "
                         f"{secs:.1f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
