"""SAM ViT-B masks: ours in bf16 and fp32 against segment-anything's own ``SamPredictor`` (fp32).

Random weights (seeded ``sam_model_registry["vit_b"]()``, saved in the published checkpoint layout
and loaded strictly into ours: no real ViT-B weights are needed), real MNI152 T1 axial slices as
uint8, the prompts of ``tests/core/test_sam_equivalence.py`` (box, points, box + points). Prints
the mask IoU of each pair per prompt and the mean / minimum. Dice against labels needs real
weights (random ones segment nothing anatomical), so it is not printed here::

    python benchmarks/bench_vit_agreement.py            # 3 slices (40, 95, 150)
    python benchmarks/bench_vit_agreement.py --rel-pos-std 0.5   # non-zero relative positions

segment-anything initialises the relative-position tables to zero, so by default the bias paths
add zeros; ``--rel-pos-std S`` draws them from N(0, S) (seeded) before the model is saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return 1.0 if u == 0 else float((a & b).sum() / u)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rel-pos-std", type=float, default=0.0, help="relative-position tables ~ N(0, S); 0: zeros")
    args = p.parse_args(argv)

    import torch
    from segment_anything import SamPredictor, sam_model_registry

    from napari_medsam._bench import real_slices
    from napari_medsam.core.build import load_model
    from napari_medsam.core.encoder import run_encoder
    from napari_medsam.core.preprocess import SliceTransform, to_model_input
    from napari_medsam.core.runtime import configure_runtime
    from napari_medsam.core.segment import Prompt2D, decode

    configure_runtime(args.threads)
    torch.manual_seed(0)
    ref = sam_model_registry["vit_b"]().eval()
    if args.rel_pos_std:
        with torch.no_grad():
            for blk in ref.image_encoder.blocks:
                blk.attn.rel_pos_h.normal_(0, args.rel_pos_std)
                blk.attn.rel_pos_w.normal_(0, args.rel_pos_std)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sam_vit_b_random.pth"
        torch.save(ref.state_dict(), path)
        fp32 = load_model("sam_vit_b", weights=path, device="cpu", precision="fp32")
    bf16 = dataclasses.replace(fp32, dtype=torch.bfloat16)
    pred = SamPredictor(ref)
    data = real_slices(args.slices)
    pairs: dict[str, list[float]] = {"ours bf16 vs ours fp32": [], "ours fp32 vs SamPredictor": [],
                                     "ours bf16 vs SamPredictor": []}
    for k in data.indices:
        img = np.ascontiguousarray(data.volume[:, :, k], dtype=np.uint8)  # MNI152 T1 is uint8 already
        pred.set_image(np.repeat(img[..., None], 3, axis=-1))
        x, _ = to_model_input(img.astype(np.float32), fp32.spec)
        emb = {name: run_encoder(m, x[None]) for name, m in (("fp32", fp32), ("bf16", bf16))}
        tf = SliceTransform.for_model(img.shape, fp32.spec)
        h, w = img.shape
        box = np.array([0.2 * w, 0.25 * h, 0.75 * w, 0.8 * h])
        pts = np.array([[0.5 * w, 0.45 * h], [0.3 * w, 0.7 * h], [0.62 * w, 0.33 * h]])
        lab = np.array([1, 0, 1])
        rc = (box[1], box[0], box[3], box[2])
        prompts = [({"box": box}, Prompt2D.from_box(rc)),
                   ({"point_coords": pts, "point_labels": lab}, Prompt2D.from_points(pts[:, ::-1], lab)),
                   ({"box": box, "point_coords": pts[:2], "point_labels": lab[:2]},
                    Prompt2D(points=pts[:2, ::-1].astype(np.float32), labels=lab[:2], box=rc))]
        for kw, prompt in prompts:
            m_ref = pred.predict(multimask_output=False, **kw)[0][0]
            ours = {n: decode(fp32, e, tf, [prompt], multimask=False)[0].mask for n, e in emb.items()}
            pairs["ours bf16 vs ours fp32"].append(_iou(ours["bf16"], ours["fp32"]))
            pairs["ours fp32 vs SamPredictor"].append(_iou(ours["fp32"], m_ref))
            pairs["ours bf16 vs SamPredictor"].append(_iou(ours["bf16"], m_ref))
        print(f"slice {k}: " + ", ".join(f"{n} {v[-3:]}" for n, v in pairs.items()), flush=True)
    print(f"\n{len(data.indices)} MNI axial slices x 3 prompts; the decoder runs fp32 on every embedding")
    print("| masks | IoU mean | IoU min |\n|---|---|---|")
    for n, v in pairs.items():
        print(f"| {n} | {np.mean(v):.4f} | {np.min(v):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
