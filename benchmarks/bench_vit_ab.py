"""SAM ViT encoder, this tree's ``nets/vit.py`` (or a revision's) against a git revision's: CPU time ratio and agreement.

Both encoders are built with the same random weights (the published layout: timings only) and run
on the same real MNI152 T1 slice, interleaved (old, new, old, new, ...), each forward timed by
``time.thread_time`` (the CPU time of the calling thread, which a shared machine and SIGSTOP pauses
disturb far less than the wall clock; with 1 torch thread it is all of the forward's CPU time). The
ratio is the median of the per-round ratios old / new. Also printed: whether the outputs are
bit-identical, and their largest difference::

    OMP_NUM_THREADS=1 python benchmarks/bench_vit_ab.py --rev HEAD --rounds 5                # bf16
    OMP_NUM_THREADS=1 python benchmarks/bench_vit_ab.py --rev HEAD --precision fp32
    OMP_NUM_THREADS=1 python benchmarks/bench_vit_ab.py --rev HEAD --with-common             # old common.py too
    OMP_NUM_THREADS=1 python benchmarks/bench_vit_ab.py --rev abc123~1 --new-rev abc123      # one commit's change

The old module is ``git show REV:src/napari_medsam/core/nets/vit.py`` imported beside the package
(``--with-common``: with that revision's ``nets/common.py`` as well; otherwise it uses this tree's);
``--new-rev``: the new side from that revision in the same way instead of this tree.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_SRC = "src/napari_medsam/core/nets/"



def _load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])

def _rev_module(rev: str, name: str, tmp: Path, with_common: bool) -> Any:
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{rev}:{_SRC}{name}.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    common = "napari_medsam.core.nets.common"
    if with_common and name != "common":
        common = _rev_module(rev, "common", tmp, with_common).__name__
    src = src.replace("from .common import", f"from {common} import").replace(
        "from .", "from napari_medsam.core.nets.")
    mod_name = f"_rev_{name}_{''.join(ch if ch.isalnum() else '_' for ch in rev)}"
    path = tmp / f"{mod_name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _like(mod: Any, enc: Any) -> Any:
    """``mod.ImageEncoderViT`` with ``enc``'s hyperparameters and weights."""
    b0 = enc.blocks[0]
    other = mod.ImageEncoderViT(
        img_size=enc.patch_embed.proj.kernel_size[0] * enc.pos_embed.shape[1],
        patch_size=enc.patch_embed.proj.kernel_size[0], embed_dim=enc.pos_embed.shape[-1], depth=len(enc.blocks),
        num_heads=b0.attn.num_heads, mlp_ratio=b0.mlp.lin1.out_features / b0.mlp.lin1.in_features,
        out_chans=enc.neck[0].out_channels, window_size=max(b.window_size for b in enc.blocks),
        global_attn_indexes=tuple(i for i, b in enumerate(enc.blocks) if b.window_size == 0))
    other.load_state_dict(enc.state_dict(), strict=True)
    return other.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default="HEAD", help="the old nets/vit.py's git revision")
    p.add_argument("--model", default="sam_vit_b")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-rev", default=None, help="the new side's revision (default: this tree)")
    p.add_argument("--with-common", action="store_true", help="the revisions' nets/common.py as well")
    p.add_argument("--rel-pos-std", type=float, default=0.0,
                   help="relative-position tables ~ N(0, S) (seeded; 0: as initialised, zeros)")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from napari_medsam._bench import bench_load, real_slices
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.runtime import configure_runtime

    rt = configure_runtime(args.threads)
    common = " + common.py" if args.with_common else ""
    print(f"load average {_load()}; {rt.threads} thread(s); {args.model} "
          f"{args.precision}; old: {args.rev}:{_SRC}vit.py{common}; new: "
          f"{f'{args.new_rev}:{_SRC}vit.py{common}' if args.new_rev else 'this tree'}", flush=True)
    loaded, _ = bench_load(args.model)
    new = loaded.model.image_encoder
    if args.rel_pos_std:
        torch.manual_seed(0)
        with torch.no_grad():
            for blk in new.blocks:
                blk.attn.rel_pos_h.normal_(0, args.rel_pos_std)
                blk.attn.rel_pos_w.normal_(0, args.rel_pos_std)
    with tempfile.TemporaryDirectory() as tmp:
        old_vit = _rev_module(args.rev, "vit", Path(tmp), args.with_common)
        new_vit = _rev_module(args.new_rev, "vit", Path(tmp), args.with_common) if args.new_rev else None
    old = _like(old_vit, new)
    if new_vit is not None:
        new = _like(new_vit, new)

    data = real_slices(1)
    x = torch.from_numpy(np.stack([VolumeEncoder(loaded, data.volume, axis=data.axis).model_input(data.indices[0])]))

    def fwd(enc: Any) -> Any:
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            return enc(x).float()

    y_old, y_new = fwd(old), fwd(new)  # warm-up, and the outputs
    ref = None
    if args.precision == "bf16":
        with torch.inference_mode():
            ref = new(x)
    print(f"outputs bit-identical: {torch.equal(y_old, y_new)}; max |new - old| {(y_new - y_old).abs().max().item():.3g}"
          + (f"; max |x - fp32| old {(y_old - ref).abs().max().item():.4g}, new {(y_new - ref).abs().max().item():.4g}"
             f" (fp32 embedding max |.| {ref.abs().max().item():.3g})" if ref is not None else ""), flush=True)
    del y_old, y_new, ref
    times: dict[str, list[float]] = {"old": [], "new": []}
    walls: dict[str, list[float]] = {"old": [], "new": []}
    faults: dict[str, list[int]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name, enc in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
            f0, t0, w0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time(), time.perf_counter()
            fwd(enc)
            times[name].append(time.thread_time() - t0)
            walls[name].append(time.perf_counter() - w0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(f"round {r}: old {times['old'][-1]:.3f} s, new {times['new'][-1]:.3f} s, "
              f"ratio {times['old'][-1] / times['new'][-1]:.3f}; wall old {walls['old'][-1]:.3f} s, "
              f"new {walls['new'][-1]:.3f} s, ratio {walls['old'][-1] / walls['new'][-1]:.3f}", flush=True)
    ratios = [a / b for a, b in zip(times["old"], times["new"], strict=True)]
    print(f"\nthread CPU s/slice, median of {args.rounds}: old {np.median(times['old']):.3f}, "
          f"new {np.median(times['new']):.3f}; old / new {np.median(ratios):.3f} "
          f"(per round {min(ratios):.3f}-{max(ratios):.3f}); page faults / slice old {int(np.median(faults['old']))}, "
          f"new {int(np.median(faults['new']))}; load average {_load()}")
    wr = [a / b for a, b in zip(walls["old"], walls["new"], strict=True)]
    print(f"wall s/slice (pauses included; with --threads > 1 the main thread's CPU time leaves out the others'), "
          f"median: old {np.median(walls['old']):.3f}, new {np.median(walls['new']):.3f}; old / new {np.median(wr):.3f} "
          f"(per round {min(wr):.3f}-{max(wr):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
