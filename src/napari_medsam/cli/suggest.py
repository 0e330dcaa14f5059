"""``napari-medsam suggest``: which slices to review next, by the uncertainty of a trained head.

``suggest IMAGE --head HEAD [-n 5] [--reviewed 3,17,40] [--axis N]`` predicts the unreviewed
slices of IMAGE with the head (the model, slice axis and intensity mapping come from the head
file), scores each (:mod:`napari_medsam.core.uncertainty`) and prints ``n`` slices, spread out,
one per line as ``SLICE SCORE``, in the order to review them. The default strategy,
``coverage``, splits the largest run of unreviewed slices inside the predicted foreground first
(SCORE: the slice's entropy); ``--strategy entropy`` (``margin``, ``tta``) ranks by that score
alone, most uncertain first.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._common import parse_int_list, positive_int, run_with_progress


def register(sub: Any) -> None:
    from ..core.uncertainty import DEFAULT_STRATEGY, STRATEGIES

    p = sub.add_parser(
        "suggest", help="print the next slices to review, in order, for a trained head (default: fill the "
                        "largest unreviewed gap first)",
        description="Predict the unreviewed slices of IMAGE with HEAD, score each by the head's uncertainty and "
                    "print the N best, spread out, one per line: SLICE SCORE.",
    )
    p.add_argument("image", metavar="IMAGE", help="the image (NIfTI, TIFF, .npy, zarr)")
    p.add_argument("--head", required=True, metavar="HEAD", help="a head file written by `napari-medsam train`")
    p.add_argument("-n", type=positive_int, default=5, help="how many slices to suggest (default 5)")
    p.add_argument("--reviewed", default=None,
                   help="slices already reviewed (never suggested), e.g. 3,17,40 or 10-20")
    p.add_argument("--axis", type=int, default=None,
                   help="slice axis; must be the head's (default: the head's own axis)")
    p.add_argument("--strategy", "--score", dest="strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES,
                   help=f"how to rank: coverage (split the largest gap between reviewed slices inside the predicted "
                        f"foreground first, at its middle) or one uncertainty score alone (default {DEFAULT_STRATEGY}; "
                        "see docs/benchmarks.md)")
    p.add_argument("--min-gap", type=positive_int, default=2,
                   help="suggested slices are at least this many slices apart (default 2: no neighbours)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, mps or cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="encoder autocast precision")
    p.add_argument("--weights", default=None, help="the backbone's checkpoint when the head was trained on a local one")
    p.add_argument("--cache-dir", default=None,
                   help="cache folder for embeddings and weights (default: the user cache directory)")
    p.add_argument("--no-disk-cache", action="store_true", help="keep embeddings in memory only")
    p.add_argument("--batch-size", type=positive_int, default=8, help="slices per batch (default 8)")
    p.set_defaults(func=run)


def suggest_steps(encoder: Any, head: Any, *, n: int, reviewed: Any = (), strategy: str, min_gap: int,
                  batch_size: int = 8) -> Any:
    """Score every unreviewed slice of ``encoder``'s volume with ``head``; return ``[(slice, score)]``."""
    import numpy as np

    from ..core.infer import predict_slices
    from ..core.progress import Progress
    from ..core.uncertainty import (
        DEFAULT_SCORE,
        coverage_ranking,
        foreground_extent,
        rank_slices,
        slice_scores,
        tta_scores,
    )

    done = {int(s) for s in reviewed}
    todo = [s for s in range(encoder.n_slices) if s not in done]
    score = DEFAULT_SCORE if strategy == "coverage" else strategy
    values = np.full(encoder.n_slices, np.nan)
    foreground = np.full(encoder.n_slices, np.nan)
    bs = max(1, int(batch_size))
    yield Progress(0, len(todo), "scoring")
    for start in range(0, len(todo), bs):
        batch = todo[start:start + bs]
        if score == "tta":
            for s, v in tta_scores(encoder, head, batch).items():
                values[s] = v
        else:
            gen = predict_slices(encoder, head, slices=batch, batch_size=bs, return_probs=True)
            res = yield from _silent(gen)
            for s in batch:
                key: list[Any] = [slice(None)] * 4
                key[encoder.axis + 1] = s
                values[s] = slice_scores(res.probs[tuple(key)])[score]
                foreground[s] = float(np.count_nonzero(res.labels[tuple(key[1:])]))
        yield Progress(start + len(batch), len(todo), "scoring")
    if strategy == "coverage":
        return coverage_ranking(values, n, extent=foreground_extent(foreground), exclude=done, min_gap=min_gap)
    return rank_slices(values, n, exclude=done, min_gap=min_gap)


def _silent(gen: Any) -> Any:
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value
    yield  # pragma: no cover - a generator


def run(args: argparse.Namespace) -> int:
    from ..core.build import load_model
    from ..core.errors import MedSamError
    from ..core.finetune import load_head, read_head_meta
    from ..core.infer import encoder_for_head
    from ..io import read_image
    from ._common import _DownloadBar, cache_from_args

    if args.strategy == "disagreement":
        raise MedSamError("--strategy disagreement compares two rounds' proposals, which a single head file "
                          "does not have: use coverage, entropy, margin or tta here (the review dock offers all)")
    meta = read_head_meta(args.head)
    if args.axis is not None and args.axis % 3 != meta.axis:
        raise MedSamError(f"the head was trained on slices along axis {meta.axis}, not {args.axis}: "
                          f"drop --axis or pass --axis {meta.axis}")
    image = read_image(args.image)
    bar = _DownloadBar()
    try:
        loaded = load_model(meta.backbone, weights=args.weights, device=args.device, precision=args.precision,
                            cache_dir=args.cache_dir, progress=bar)
    finally:
        bar.close()
    head = load_head(args.head, loaded=loaded)
    encoder = encoder_for_head(loaded, image, head, cache=cache_from_args(args))
    reviewed = parse_int_list(args.reviewed) or []
    bad = [s for s in reviewed if not 0 <= s < encoder.n_slices]
    if bad:
        raise MedSamError(f"--reviewed slices {bad[:8]} are outside 0..{encoder.n_slices - 1} along axis {meta.axis}")
    ranked = run_with_progress(suggest_steps(encoder, head, n=args.n, reviewed=reviewed, strategy=args.strategy,
                                             min_gap=args.min_gap, batch_size=args.batch_size), "scoring")
    for s, v in ranked:
        print(f"{s} {v:.6g}")
    return 0
