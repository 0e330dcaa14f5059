"""``napari-medsam train``: few-shot prompt-free heads from the shell.

``train IMAGE LABELS --head KIND -o HEAD`` embeds the labelled slices (through the cache), trains a
head on them and writes one head file. ``napari-medsam predict`` (:mod:`.predict`) segments whole
images or cohorts with it.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..core.heads import HEADS
from ._common import (
    add_image_args,
    add_model_args,
    add_overwrite_arg,
    check_outputs,
    nonneg_int,
    parse_int_list,
    positive_float,
    positive_int,
    run_with_progress,
    slices_arg,
)

HEAD_KINDS = tuple(HEADS)  # the head registry's families


def register(sub: Any) -> None:
    t = sub.add_parser(
        "train", help="train a prompt-free head on a few labelled slices",
        description="Train a light head on frozen embeddings of the labelled slices of IMAGE "
                    "(AutoSAM recipe) and write it to one head file.",
    )
    t.add_argument("image", metavar="IMAGE", help="the image (NIfTI, TIFF, .npy, zarr)")
    t.add_argument("labels", metavar="LABELS",
                   help="integer labels of the same shape: 0 background, 1..K classes")
    t.add_argument("--head", default=None, choices=HEAD_KINDS, help="head family (required unless --init)")
    t.add_argument("--init", default=None, metavar="HEAD",
                   help="continue training this head file (warm start): its family, slice axis, intensity mapping "
                        "and classes are kept; classes new in LABELS are added")
    t.add_argument("-o", "--output", required=True, metavar="HEAD", help="head file to write (e.g. brain.head.pt)")
    t.add_argument("--slices", type=slices_arg, default=None,
                   help="training slices along --axis, e.g. 3,17,40 or 10-20 (default: every slice with a label)")
    from ..app.params import add_dataclass_arguments
    from ..core.finetune import TrainParams

    # the options, their defaults and the Fine-tune dock's controls all come from TrainParams
    add_dataclass_arguments(t, TrainParams, {
        "epochs": "most passes over the labelled slices",
        "max_steps": "most optimiser steps",
        "seed": "random seed",
        "lr": "learning rate",
        "batch_size": "slices per step",
        "patience": "stop after this many epochs without improvement (0: never)",
        "augment": "no random flips and shifts",
        "threads": "torch threads for training (0: torch's default)",
    }, types={"epochs": positive_int, "max_steps": positive_int, "lr": positive_float, "batch_size": positive_int,
              "patience": nonneg_int, "threads": nonneg_int},
       defaults={"epochs": "as many as fit in --max-steps", "lr": "the head's own",
                 "threads": "all cores but one"})
    t.add_argument("--no-image-skip", action="store_true",
                   help="cnn head: no skip connections from the image (embeddings only)")
    t.add_argument("--class-names", default=None, help="comma-separated names of classes 1..K, e.g. GM,WM")
    add_overwrite_arg(t)
    add_model_args(t)
    add_image_args(t)
    from .adapters import add_train_args

    add_train_args(t)  # --adapter medsa|lora [--sd-trans] [--hyp] [--rank R]: cli/adapters.py
    t.set_defaults(func=run_train)


# ------------------------------------------------------------------------------------------------


def _same_file(a: Any, b: Any) -> bool:
    import os

    try:
        return bool(a) and bool(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _read_labels(path: str, image: Any) -> Any:
    import numpy as np

    from ..core.errors import InvalidImageError
    from ..io import read_image

    if _same_file(path, image.source):
        raise InvalidImageError(f"{path} is the image itself, not its labels: give the label file "
                                "(0 background, 1..K classes) drawn on this image")
    lab = np.asarray(read_image(path).data[...])
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            raise InvalidImageError(f"{path}: labels must be whole numbers (0 background, 1..K classes)")
        lab = lab.astype(np.int64)
    if tuple(lab.shape) != tuple(image.spatial_shape):
        raise InvalidImageError(
            f"{path}: labels of shape {tuple(lab.shape)} do not match the image's shape "
            f"{tuple(image.spatial_shape)} (same array order, voxel for voxel)")
    return lab


def run_train(args: argparse.Namespace) -> int:
    if getattr(args, "adapter", None):
        from .adapters import run_train as run_adapter_train

        return run_adapter_train(args)
    from ..app.params import dataclass_kwargs
    from ..app.training import train_head_steps
    from ..core.errors import MedSamError
    from ..core.finetune import TrainParams, save_head
    from ..io import read_image
    from ._common import encoder_from_args, load_from_args

    check_outputs(args, [args.output], [args.image, args.labels, args.weights], kind="file")
    image = read_image(args.image)
    labels = _read_labels(args.labels, image)
    if args.head is None and args.init is None:
        raise MedSamError("give the head family with --head (e.g. --head cnn), or a head file to continue with --init")
    loaded = load_from_args(args)
    from .adapters import apply_from_args

    loaded = apply_from_args(args, loaded, attr="with_adapter")  # a head on adapted embeddings
    init = None
    if args.init is not None:
        from ..core.finetune import load_head
        from ..core.infer import encoder_for_head
        from ._common import cache_from_args

        init = load_head(args.init, loaded=loaded)
        encoder = encoder_for_head(loaded, image, init, cache=cache_from_args(args))  # the head's axis and mapping
    else:
        encoder = encoder_from_args(args, loaded, image)
    slices = parse_int_list(args.slices)
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    config = {"image_skip": False} if args.no_image_skip and args.head == "cnn" else {}
    params = TrainParams(**{**dataclass_kwargs(TrainParams, args), "head": args.head or init.kind, "head_config": config})
    # the one training pipeline the Fine-tune widget runs too (app.training)
    head = run_with_progress(train_head_steps(encoder, labels, slices, params, class_names=names, init=init),
                             "training", unit="step")
    out = save_head(args.output, head)
    h, m = head.meta.history, head.meta
    trained = m.training_slices
    print(f"{'continued' if init is not None else 'trained'} a {head.kind} head on {len(trained)} slice(s) along axis {m.axis} "
          f"({', '.join(str(s) for s in trained[:12])}{', ...' if len(trained) > 12 else ''}), "
          f"classes {list(m.class_ids)}: {h['steps']} steps in {h['seconds']:.1f} s ({h.get('precision', 'fp32')}), "
          f"final loss {h['final_loss']:.4f}; wrote {out}")
    return 0
