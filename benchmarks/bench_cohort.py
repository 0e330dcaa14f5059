"""Cohort throughput: volumes per minute of ``napari-medsam predict`` in process and on 1 / 2 workers.

Prints the table of docs/benchmarks.md, section Cohorts::

    python benchmarks/bench_cohort.py                       # LiteMedSAM, 8 small MNI volumes (6 NIfTI, 2 DICOM)
    python benchmarks/bench_cohort.py --workers 0,1,2 --volumes 12 --step 6 --device cpu

The volumes are the MNI152 T1 brain box sampled every ``--step`` voxels from different offsets
(some written as DICOM series with pydicom); the head is a linear head trained for a few epochs
on one such volume. Every condition predicts the same cohort from scratch (no disk cache, fresh
output folder). ``wall`` counts everything a user waits for (cluster start, model loads, closing);
``steady`` the volumes finished after the first one, over the time since that first one.
``0`` workers = in this process, one volume after another.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the cohort builders live beside the tests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts; 0 = in process")
    p.add_argument("--volumes", type=int, default=8)
    p.add_argument("--dicom", type=int, default=2, help="how many of the volumes are DICOM series")
    p.add_argument("--step", type=int, default=6, help="MNI subsampling (6: about 28 x 33 x 27 voxels)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores // workers)")
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)

    import nibabel as nib
    import numpy as np
    from tests.app.cohort_data import make_cohort, train_head
    from tests.conftest import MNI_GM, MNI_T1, MNI_WM

    from napari_medsam.app.cohort import CohortParams, cluster_threads, expand_inputs, plan, run_cohort

    t1_img = nib.load(MNI_T1)
    t1 = np.asanyarray(t1_img.dataobj)
    brain = (np.asanyarray(nib.load(MNI_GM).dataobj) + np.asanyarray(nib.load(MNI_WM).dataobj)) > 0.5
    tmp = Path(tempfile.mkdtemp(prefix="bench-cohort-"))
    try:
        head = train_head(tmp / "head", t1, brain, t1_img.affine, step=args.step, model=args.model)
        make_cohort(tmp / "cohort", t1, t1_img.affine, n_nifti=args.volumes - args.dicom, n_dicom=args.dicom,
                    step=args.step, corrupt=False)
        inputs = expand_inputs([tmp / "cohort"])
        params = CohortParams(head=str(head), device=args.device, disk_cache=False, torch_threads=args.threads)
        rows = []
        for w in (int(v) for v in args.workers.split(",")):
            out = tmp / f"out{w}"
            items = plan(inputs, out)
            t0 = time.perf_counter()
            first = None
            gen = run_cohort(items, params, workers=w or None, resume=False)
            while True:
                try:
                    prog = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                if prog.step == 1 and first is None:
                    first = time.perf_counter()
            wall = time.perf_counter() - t0
            done = result.count("done")
            steady = (done - 1) / (time.perf_counter() - first) * 60 if first and done > 1 else float("nan")
            threads = args.threads or (cluster_threads(w) if w else 0)
            rows.append({"workers": w, "torch_threads": threads, "volumes": done, "wall_s": round(wall, 1),
                         "per_min_wall": round(done / wall * 60, 1), "per_min_steady": round(steady, 1),
                         "median_s_per_volume": round(float(np.median([r.seconds for r in result.results])), 2)})
            shutil.rmtree(out, ignore_errors=True)
        shape = next(tuple(int(s) for s in nib.load(i).shape) for i in inputs if i.endswith(".nii.gz"))
        print(f"model {args.model}, device {args.device}, {len(inputs)} volumes ({args.dicom} DICOM), "
              f"first volume {shape}, cores {cluster_threads(1)}")
        print("| workers | torch threads / worker | volumes | wall s | volumes/min (wall) | volumes/min "
              "(after the first) | median s / volume |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['workers'] or 'in process'} | {r['torch_threads'] or 'default'} | {r['volumes']} | "
                  f"{r['wall_s']} | {r['per_min_wall']} | {r['per_min_steady']} | {r['median_s_per_volume']} |")
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
