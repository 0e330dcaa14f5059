"""``napari-medsam predict``: segment whole images, or a whole cohort, with a trained head, no prompt.

``predict IMAGE [IMAGE...] --head HEAD -o OUT``: the model, slice axis and intensity mapping come
from the head file. IMAGE may be a file, a glob, a folder (a DICOM series folder is one volume
per series; other folders are searched for images) or a CSV / TXT list of paths. Without
``--workers`` / ``--scheduler`` the volumes run one after another in this process; ``--workers N``
starts a dask LocalCluster, ``--scheduler ADDRESS`` uses a running one (see
:mod:`napari_medsam.app.cohort`). Volumes already done (their sidecar matches) are skipped; a
failed volume is retried once, then listed in the summary CSV with its reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._common import (
    add_overwrite_arg,
    add_runtime_args,
    check_outputs,
    nonneg_int,
    positive_int,
    run_with_progress,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "predict", help="segment whole images (or a cohort) with a trained head, no prompt",
        description="Segment every slice of each IMAGE with a head trained by `napari-medsam train`. "
                    "The model, slice axis and intensity mapping come from the head file. IMAGE may be a "
                    "file, a glob, a folder (DICOM series folders count as one volume per series) or a "
                    "CSV/TXT list of paths.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="images, globs, folders or .csv/.txt lists (NIfTI, TIFF, .npy, zarr, DICOM)")
    p.add_argument("--head", required=True, metavar="HEAD", help="a head file written by `napari-medsam train`")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output labels: a file for one input; a folder for several (one file per input, "
                        "named after it: .nii.gz for NIfTI and DICOM inputs, else the input's extension)")
    p.add_argument("--format", default="auto", choices=("auto", "nii.gz", "nii", "ome.zarr", "zarr", "tif", "npy"),
                   help="output format in a folder (default auto: see -o); ome.zarr writes the image and "
                        "the labels as NGFF pyramids")
    p.add_argument("--dicom-seg", action="store_true",
                   help="also write a DICOM-SEG file (<output name>.seg.dcm) for each DICOM input")
    p.add_argument("--probabilities", default=None, metavar="PATH",
                   help="also write per-class probabilities (float32) into the folder PATH, one file per "
                        "input and class: <input name>_prob_<class name><ext>")
    p.add_argument("--weights", default=None, help="the backbone's checkpoint when the head was trained on a local one")
    add_runtime_args(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="slices per batch (default 8)")
    g = p.add_argument_group("cohorts")
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="run N workers on a dask LocalCluster (torch threads per worker: cores // N)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="use a running dask scheduler, e.g. tcp://10.0.0.5:8786 (workers need napari-medsam)")
    g.add_argument("--threads", type=nonneg_int, default=0,
                   help="torch threads per worker (default: cores // workers; 0: that default)")
    g.add_argument("--memory-limit", default="auto",
                   help="memory per LocalCluster worker, e.g. 4GB (default auto: the machine's memory / N)")
    g.add_argument("--retries", type=nonneg_int, default=1, help="extra attempts for a failed volume (default 1)")
    g.add_argument("--summary", default=None, metavar="CSV",
                   help="summary table (input, output, status, seconds, voxels per class, error); default "
                        "OUT/predict_summary.csv when OUT is a folder")
    g.add_argument("--no-resume", action="store_true",
                   help="predict every volume again, even those whose output and sidecar are up to date")
    from .adapters import add_file_arg

    add_file_arg(p)  # --adapter FILE: for a head trained with `train --with-adapter FILE`
    add_overwrite_arg(p)
    p.set_defaults(func=run_predict)


def _is_listing(spec: str) -> bool:
    """A spec that stands for several volumes: a list file, a glob, a folder of volumes."""
    from ..io.dicom import is_dicom_path
    from ..io.readers import image_format

    path = Path(spec).expanduser()
    if path.is_file():
        return path.suffix.lower() in (".csv", ".txt", ".lst") and image_format(path) is None
    if path.is_dir():
        return image_format(path) is None and not is_dicom_path(path)
    return not path.exists() and bool(set("*?[") & set(spec))


def run_predict(args: argparse.Namespace) -> int:
    from ..app.cohort import CohortParams, expand_inputs, plan, previous_outcome, run_cohort
    from ..core.errors import MedSamError
    from ..core.finetune import read_head_meta
    from ..core.weights import file_sha256
    from ..io.readers import image_format, split_extension

    out = Path(args.output).expanduser()
    specs = [str(s) for s in args.images]
    inputs = expand_inputs(specs)
    single = (len(inputs) == 1 and not any(map(_is_listing, specs)) and not out.is_dir()
              and image_format(out) is not None)
    fmt = "auto" if args.format == "auto" else f".{args.format}"
    items = plan(inputs, out, fmt=fmt, single_file=single)
    meta = read_head_meta(args.head)
    from ..core.adapt import read_adapter_meta
    from ..core.finetune import check_head_adapter

    check_head_adapter(meta, read_adapter_meta(args.adapter).digest if args.adapter else "")  # before any work
    params = CohortParams(head=args.head, weights=args.weights, device=args.device, precision=args.precision,
                          cache_dir=args.cache_dir, disk_cache=not args.no_disk_cache, batch_size=args.batch_size,
                          probabilities=args.probabilities, dicom_seg=args.dicom_seg, torch_threads=args.threads,
                          adapter=args.adapter)
    head_sha = file_sha256(args.head)
    if args.adapter:  # an output is up to date only for the same head and the same adapter
        head_sha += "+adapter:" + file_sha256(args.adapter)
    todo = [it for it in items if args.no_resume or previous_outcome(it, head_sha) is None]
    sources = [*(i.split("::")[0] for i in inputs), args.head, args.weights, args.adapter]
    check_outputs(args, [Path(it.output) for it in todo], sources)
    if args.probabilities is not None:
        probs = []
        for it in todo:
            stem, ext = split_extension(it.output)
            probs += [Path(args.probabilities) / f"{stem}_prob_{_safe(n)}{ext}" for n in ("background", *meta.class_names)]
        check_outputs(args, probs, sources)
    summary = args.summary
    if summary is None and not single:
        summary = str(out / "predict_summary.csv")
    if args.workers is None and args.scheduler is None and len(todo) and not single:
        print(f"predicting {len(todo)} of {len(items)} volume(s) in this process "
              f"({len(items) - len(todo)} already done)", file=sys.stderr)
    gen = run_cohort(items, params, workers=args.workers, scheduler=args.scheduler,
                     memory_limit=_memory(args.memory_limit), retries=args.retries, summary=summary,
                     resume=not args.no_resume)
    result = run_with_progress(gen, "predict", unit="volume", announce={"dashboard": "dask dashboard"})
    failed = 0
    for r in result.results:
        if r.status == "done":
            print(f"{r.input} -> {r.output} (voxels per class: {r.voxels})")
        elif r.status == "skipped":
            print(f"{r.input} -> {r.output} (already done, skipped)")
        else:
            failed += 1
            print(f"napari-medsam predict: {r.input}: failed after {r.attempts} attempt(s): {r.error}",
                  file=sys.stderr)
    if result.summary_path:
        print(f"summary: {result.summary_path}", file=sys.stderr)
    if failed:
        raise MedSamError(f"{failed} of {len(items)} volume(s) failed (the others were written); "
                          f"see the error lines above{' and ' + result.summary_path if result.summary_path else ''}")
    return 0


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def _memory(text: str) -> Any:
    if text in (None, "", "auto"):
        return "auto"
    return None if text.lower() in ("none", "0") else text
