"""``napari-medsam embed IMAGE``: precompute and cache the embeddings of every slice."""

from __future__ import annotations

import argparse
import time

from ._common import (
    add_image_args,
    add_model_args,
    encoder_from_args,
    load_from_args,
    parse_int_list,
    positive_int,
    run_with_progress,
    slices_arg,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed every slice of an image into the on-disk cache",
                       description="Embed the slices of IMAGE (.nii/.nii.gz, .tif/.tiff, .npy, .zarr) along --axis "
                                   "and store them in the embedding cache; a second run is a cache hit.")
    p.add_argument("image", help="the image or volume file")
    add_model_args(p)
    add_image_args(p)
    p.add_argument("--slices", type=slices_arg, default=None, help="only these slice indices, e.g. 3,17,40 or 10-20")
    p.add_argument("--batch-size", type=positive_int, default=4, help="slices per encoder call (default 4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import read_image

    t0 = time.perf_counter()
    volume = read_image(args.image)
    loaded = load_from_args(args)
    enc = encoder_from_args(args, loaded, volume)
    enc.batch_size = max(1, args.batch_size)
    t_setup = time.perf_counter() - t0
    summary = run_with_progress(enc.embed(parse_int_list(args.slices)), f"embedding ({loaded.name})")
    n = summary["computed"] + summary["cached"]
    per = summary["seconds"] / summary["computed"] if summary["computed"] else 0.0
    print(f"{args.image}: {n} slices along axis {enc.axis} of shape {enc.slice_shape} with {loaded.name} on "
          f"{loaded.device.type} ({enc.intensity.key()})")
    print(f"computed {summary['computed']}, cache hits {summary['cached']}; "
          f"embedding time {summary['seconds']:.2f} s ({per:.3f} s/slice computed); setup {t_setup:.2f} s")
    print(f"cache: {enc.cache.cache_dir}")
    return 0
