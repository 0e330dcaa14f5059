"""``napari-medsam segment IMAGE``: boxes and points on slices, optional 3D propagation, a label volume out."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from ._common import (
    add_image_args,
    add_model_args,
    add_overwrite_arg,
    check_outputs,
    encoder_from_args,
    load_from_args,
    run_with_progress,
)


def _floats(text: str, n: int, what: str) -> list[float]:
    parts = text.split(",")
    if len(parts) != n:
        raise argparse.ArgumentTypeError(f"{what} needs {n} comma-separated numbers, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{what}: {e}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{what} needs finite numbers, got {text!r}")
    if values[0] != int(values[0]) or values[0] < 0:
        raise argparse.ArgumentTypeError(f"{what}: the slice index Z must be a whole number >= 0, got {parts[0]!r}")
    return values


def box_arg(text: str) -> tuple[int, tuple[float, float, float, float]]:
    z, r0, c0, r1, c1 = _floats(text, 5, "--box Z,R0,C0,R1,C1")
    if not (r1 > r0 and c1 > c0):
        raise argparse.ArgumentTypeError(f"--box Z,R0,C0,R1,C1 needs R1 > R0 and C1 > C0, got {text!r}")
    return int(z), (r0, c0, r1, c1)


def _context_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--zoom CONTEXT needs a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"--zoom CONTEXT is the window's side over the box's: a number >= 1, "
                                         f"got {text!r}")
    return value


def point_arg(text: str) -> tuple[int, float, float, int]:
    z, r, c, label = _floats(text, 4, "--point Z,R,C,LABEL")
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(f"--point LABEL must be 1 (positive) or 0 (negative), got {label:g}")
    return int(z), r, c, int(label)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment", help="segment objects from boxes/points on slices, optionally through the volume",
        description="Each --box is one object (label 1, 2, ... in the order given). --point prompts attach to "
                    "the object whose box is on the same slice (or form one object per slice without a box). "
                    "Z is the slice index along --axis; rows and columns are array indices in that slice; "
                    "for a 2D image Z is 0. The output is a label volume of the input's shape.")
    p.add_argument("image", help="the image or volume file")
    p.add_argument("--box", type=box_arg, action="append", default=[], metavar="Z,R0,C0,R1,C1")
    p.add_argument("--point", type=point_arg, action="append", default=[], metavar="Z,R,C,LABEL")
    p.add_argument("--propagate", action="store_true",
                   help="carry each object through the volume (3D); each stops where its structure ends")
    p.add_argument("--range", default=None, metavar="A:B",
                   help="--propagate: write only slices A to B along --axis (both included; either may be "
                        "empty, negative counts from the end; default: the whole volume)")
    p.add_argument("--auto", type=int, action="append", default=[], metavar="Z",
                   help="segment everything on slice Z from a grid of points, each object its own label "
                        "(models trained with point prompts: SAM, MobileSAM); repeatable")
    from ..core.automatic import AutoParams

    d = AutoParams()
    p.add_argument("--points-per-side", type=int, default=d.points_per_side, help=argparse.SUPPRESS)
    p.add_argument("--pred-iou-thresh", type=float, default=d.pred_iou_thresh,
                   help=f"--auto: least predicted IoU of an object (default {d.pred_iou_thresh})")
    p.add_argument("--stability-thresh", type=float, default=d.stability_score_thresh,
                   help=f"--auto: least stability score of an object (default {d.stability_score_thresh})")
    from ..core.zoom import DEFAULT_CONTEXT

    zoom = p.add_mutually_exclusive_group()
    zoom.add_argument("--zoom", type=_context_arg, default=DEFAULT_CONTEXT, metavar="CONTEXT",
                      help="a small box (without --propagate) is segmented on the square around it, CONTEXT "
                           "times the box's longer side, at the model's full input: sharper masks of small "
                           f"structures for one encoder pass per box (default {DEFAULT_CONTEXT:g}; a box too "
                           "large to be magnified 1.5 times is segmented on its slice as before)")
    zoom.add_argument("--no-zoom", action="store_true", help="segment every box on its whole slice")
    p.add_argument("-o", "--output", required=True,
                   help="output label file: .nii.gz (keeps a NIfTI input's geometry), .tif, .npy or .zarr")
    add_overwrite_arg(p)
    add_model_args(p)
    from .adapters import add_file_arg

    add_file_arg(p)  # --adapter FILE
    add_image_args(p)
    p.set_defaults(func=run)


def build_objects(boxes: list, points: list) -> list[tuple[int, object]]:
    """Group CLI prompts into objects: ``[(slice, Prompt2D), ...]`` in label order."""
    from ..core.errors import PromptError
    from ..core.segment import Prompt2D

    objects: list[tuple[int, dict]] = [(z, {"box": b, "pts": [], "lab": []}) for z, b in boxes]
    by_slice: dict[int, dict] = {}
    for z, obj in objects:
        by_slice.setdefault(z, obj)
    for z, r, c, lab in points:
        obj = by_slice.get(z)
        if obj is None:
            obj = {"box": None, "pts": [], "lab": []}
            objects.append((z, obj))
            by_slice[z] = obj
        obj["pts"].append((r, c))
        obj["lab"].append(lab)
    if not objects:
        raise PromptError("give at least one --box Z,R0,C0,R1,C1 or --point Z,R,C,LABEL")
    return [(z, Prompt2D(points=np.asarray(o["pts"], np.float32).reshape(-1, 2),
                         labels=np.asarray(o["lab"], np.int64), box=o["box"])) for z, o in objects]


def run(args: argparse.Namespace) -> int:
    from ..core.propagation import parse_range, propagate
    from ..core.segment import box_of, segment_slice, validate_prompt
    from ..core.zoom import box_zoom_window, decode_zoomed, zoom_gain
    from ..io import read_image, write_labels

    t0 = time.perf_counter()
    check_outputs(args, [args.output], [args.image, args.weights])
    volume = read_image(args.image)
    loaded = load_from_args(args)
    from .adapters import apply_from_args

    loaded = apply_from_args(args, loaded)
    enc = encoder_from_args(args, loaded, volume)
    auto = list(getattr(args, "auto", []) or [])
    if auto:
        from ..core.automatic import check_can_segment_everything
        from ..core.errors import PromptError

        check_can_segment_everything(loaded.spec)
        bad = [z for z in auto if not 0 <= z < enc.n_slices]
        if bad:
            raise PromptError(f"--auto slice {bad[0]} is outside 0..{enc.n_slices - 1}")
    objects = build_objects(args.box, args.point) if (args.box or args.point or not auto) else []
    span = (0, enc.n_slices)
    if args.range is not None:
        from ..core.errors import PromptError

        if not (args.propagate and enc.is_3d):
            raise PromptError("--range A:B bounds --propagate on a 3D volume: add --propagate or drop --range")
        span = parse_range(args.range, enc.n_slices, inclusive=True)
    if loaded.spec.box_preferred and any(p.box is None for _, p in objects):
        print(f"note: {loaded.name} was trained with box prompts; points work, but a box is the reliable prompt")
    spatial = volume.shape[:-1] if volume.rgb else volume.shape
    dtype = np.uint8 if len(objects) < 256 and not auto else np.uint16
    labels = np.zeros(spatial, dtype=dtype)

    def put(z: int, mask: np.ndarray, label: int) -> None:
        if enc.is_3d:
            idx: list = [slice(None)] * 3
            idx[enc.axis] = z
            view = labels[tuple(idx)]
        else:
            view = labels
        view[mask] = label

    for label, (z, prompt) in enumerate(objects, start=1):
        if args.propagate and enc.is_3d:
            masks = run_with_progress(propagate(enc, {z: prompt}, start=span[0], stop=span[1]),
                                      f"object {label}: propagating")
            for zz, m in masks.items():
                put(zz, m, label)
            ends = "; ".join(f"{'down' if s.direction < 0 else 'up'} to {s.last} ({s.reason})" for s in masks.stops)
            print(f"object {label}: {len(masks)} slices, {int(sum(m.sum() for m in masks.values()))} voxels; {ends}")
        else:
            validate_prompt(prompt, enc.slice_shape)  # in the slice's terms, before any window
            window = box_zoom_window(prompt, enc.slice_shape, None if args.no_zoom else args.zoom)
            if window is None:
                res, zoomed = segment_slice(enc, z, [prompt])[0], ""
            else:  # the window's embedding only: the slice's own is not needed
                (res,), _emb = decode_zoomed(enc, z, prompt, window)
                r0, c0, r1, c1 = window
                zoomed = f", zoomed x{zoom_gain(window, enc.slice_shape):.1f} on rows {r0}:{r1} columns {c0}:{c1}"
            put(z, res.mask, label)
            b = box_of(res.mask)
            print(f"object {label}: slice {z}, {int(res.mask.sum())} pixels, predicted IoU {res.iou:.3f}, "
                  f"bounding box {tuple(round(v) for v in b) if b else None}{zoomed}")
    if auto:
        from ..core.automatic import AutoParams, segment_everything_slice

        params = AutoParams(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                            stability_score_thresh=args.stability_thresh)
        first = len(objects) + 1
        for z in auto:
            lab = run_with_progress(segment_everything_slice(enc, z, params=params), f"slice {z}: everything",
                                    unit="batch")
            for k in range(1, int(lab.max()) + 1):
                put(z, lab == k, first + k - 1)
            print(f"slice {z}: {int(lab.max())} objects (labels {first}..{first + int(lab.max()) - 1}), "
                  "segment everything")
            first += int(lab.max())
    out = write_labels(args.output, labels, reference=volume)
    print(f"wrote {out} ({labels.shape}, labels 0..{int(labels.max())}) in {time.perf_counter() - t0:.1f} s")
    return 0
