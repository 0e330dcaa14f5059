"""``napari-medsam models``: the registry as a table, with where each model's weights are."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models, their input sizes, sizes and whether weights are here")
    p.add_argument("--all", action="store_true", help="include the tiny random test models")
    p.add_argument("--cache-dir", default=None, help="weights folder root (default: the user cache directory)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.build import count_parameters
    from ..core.registry import DEFAULT_MODEL, MODELS, list_models
    from ..core.weights import has_published_checksum, how_to_get, trusted_hashes, weights_available

    rows = []
    for name in list_models(include_test=args.all):
        spec = MODELS[name]
        if spec.weights.random_init:
            status = "random weights (tests)"
        else:
            found = weights_available(spec, cache_dir=args.cache_dir)
            if found is not None:
                status = "bundled, offline" if spec.weights.bundled_package and "site-packages" in str(found) \
                    else f"available: {found}"
                if not has_published_checksum(spec) and spec.weights.filename not in trusted_hashes(args.cache_dir):
                    status += " (no published checksum: pass --trust-weights once to use it)"
            elif spec.weights.url:
                status = f"downloads on first use from {spec.weights.url}"
            else:
                status = f"not here: {how_to_get(spec, cache_dir=args.cache_dir)}"
        params = count_parameters(spec)
        rows.append((name + (" (default)" if name == DEFAULT_MODEL else ""), spec.family,
                     f"{spec.input_size}", f"{params / 1e6:.1f}M", "+".join(spec.prompts), status))
    header = ("name", "family", "input", "params", "trained prompts", "weights")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return 0
