"""Show a few unseen slices of ``bench_heads.py --save-masks`` runs: image, labels, each head's prediction.

    python benchmarks/plot_head_masks.py /tmp/masks/coronal_k3_cnn_s0.npz /tmp/masks/coronal_k3_hsam_s0.npz \
        --out docs/images/09-hsam-selfprompt-unseen-slices.png

Every file must hold the same evaluation slices (the same plane and k). GM red, WM blue.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rgb = np.repeat(image[..., None].astype(np.float32), 3, axis=-1)
    rgb = (rgb - rgb.min()) / max(1e-6, float(rgb.max() - rgb.min()))
    for value, colour in ((1, (1.0, 0.15, 0.15)), (2, (0.2, 0.4, 1.0))):
        m = labels == value
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.asarray(colour)
    return rgb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help=".npz files written by bench_heads.py --save-masks")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=4, help="slices to show, spread through the evaluation slices")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [np.load(p) for p in args.runs]
    slices = runs[0]["slices"]
    pick = np.linspace(0, len(slices) - 1, args.n + 2)[1:-1].round().astype(int)
    cols = 2 + len(runs)
    fig, axes = plt.subplots(args.n, cols, figsize=(2.2 * cols, 2.4 * args.n), squeeze=False)
    for r, j in enumerate(pick):
        image = runs[0]["image"][j].astype(np.float32)
        panels = [(image, None, "T1"), (image, runs[0]["truth"][j], "labels")]
        panels += [(image, run["pred"][j], p.stem) for run, p in zip(runs, args.runs, strict=True)]
        for c, (img, lab, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.rot90(overlay(img, lab) if lab is not None else img), cmap="gray")
            ax.set_title(f"{title}\nslice {int(slices[j])}" if c == 0 else title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
