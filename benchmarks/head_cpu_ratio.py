"""CPU seconds of a few training steps per head (cnn, hsam, selfprompt) on MNI152 coronal k = 3: a time ratio that load does not skew.

    python benchmarks/head_cpu_ratio.py --steps 40 --cache-dir /tmp/hb/cache

On a shared machine the wall seconds of ``bench_heads.py`` move with other processes' load (a head
trained while the load rose looks slower); the process CPU time of a 1-thread run does not, or much
less. Each head trains ``--steps`` steps with the plateau stop off (every benchmark run used all 150).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_heads import load_mni, spread  # noqa: E402

VARIANTS = [("cnn", {}), ("hsam", {}), ("selfprompt", {}),
            ("hsam", {"masa": True, "hierarchical": True, "stage2_layers": 2}), ("cnn", {}), ("hsam", {})]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--precision", default="fp32",
                    help="the model's precision (default fp32, the issue-13 table's); the heads follow it "
                         "under TrainParams.precision='auto' (auto: bf16 where the CPU has it natively)")
    args = ap.parse_args(argv)
    from napari_medsam.core.build import load_model
    from napari_medsam.core.embeddings import EmbeddingCache
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.finetune import TrainParams, collect_training_data, fine_tune
    from napari_medsam.core.progress import drain

    torch.set_num_threads(1)
    image, labels = load_mni()
    lab = np.moveaxis(labels, 1, 0)
    train = spread([i for i in range(lab.shape[0]) if lab[i].any()], args.k)
    loaded = load_model("litemedsam", device="cpu", precision=args.precision)
    enc = VolumeEncoder(loaded, image, axis=1, cache=EmbeddingCache(args.cache_dir))
    drain(enc.embed(train))
    data = drain(collect_training_data(enc, labels, train))
    for kind, cfg in VARIANTS:
        t0, w0 = time.process_time(), time.perf_counter()
        params = TrainParams(head=kind, head_config=cfg, seed=0, threads=0, max_steps=args.steps, patience=0)
        head = drain(fine_tune(data, params, loaded=loaded, class_names=("GM", "WM")))
        print(kind, cfg, f"cpu {time.process_time() - t0:.1f} s, wall {time.perf_counter() - w0:.1f} s, "
              f"steps {head.meta.history['steps']}, trained in {head.meta.history.get('precision', 'fp32')}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
