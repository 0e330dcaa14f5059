"""Propagation time per slice and 3D Dice on the MNI152 template (nilearn's copy).

One box around the brain on a coronal slice, propagated +-N slices, twice: with a cold embedding
cache (encoder + decoder per slice) and warm (decoder only). Prints seconds per slice for both and
the 3D Dice against the grey+white matter mask, both measured in this run.

    python benchmarks/bench_propagation.py [--model litemedsam] [--slice 93] [--reach 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_medsam.core.build import load_model
from napari_medsam.core.embeddings import EmbeddingCache
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.progress import drain
from napari_medsam.core.segment import Prompt2D, PropagationParams, box_of, propagate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--slice", type=int, default=93)
    ap.add_argument("--reach", type=int, default=10)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    data = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0]) / "datasets" / "data"
    t1 = np.asanyarray(nib.load(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").dataobj)
    gm = np.asanyarray(nib.load(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj)
    wm = np.asanyarray(nib.load(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj)
    brain = (gm.astype(np.float32) + wm) > 0.5
    loaded = load_model(args.model, device=args.device)
    z = args.slice
    seed = Prompt2D.from_box(box_of(brain[:, z, :]))
    params = PropagationParams(max_slices=args.reach)
    with tempfile.TemporaryDirectory() as tmp:
        enc = VolumeEncoder(loaded, t1, axis=1, cache=EmbeddingCache(tmp))
        t0 = time.perf_counter()
        out = drain(propagate(enc, {z: seed}, params=params))
        cold = time.perf_counter() - t0
        visited = len(enc.cached_indices())
        t0 = time.perf_counter()
        out = drain(propagate(enc, {z: seed}, params=params))
        warm = time.perf_counter() - t0
    zs = range(z - args.reach, z + args.reach + 1)
    pred = np.stack([out.get(k, np.zeros(brain.shape[::2], bool)) for k in zs])
    ref = np.stack([brain[:, k, :] for k in zs])
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    print(f"model {loaded.name} on {loaded.device.type}; seed coronal slice {z}, reach +-{args.reach}")
    print(f"slices visited {visited}, with a mask {len(out)}")
    print(f"cold cache: {cold / visited:.3f} s/slice (encoder + decoder); warm: {warm / visited * 1e3:.1f} ms/slice "
          f"(decoder only); ratio {cold / warm:.1f}x")
    print(f"3D Dice vs grey+white matter over +-{args.reach} slices: {dice:.3f}")


if __name__ == "__main__":
    main()
