"""``napari-medsam gui [IMAGE]``: napari with the plugin docked (headless job without a display)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gui", help="open napari on an image (default: the MNI152 sample) with the plugin's "
                                   "widgets and the bundled model; without a display, run the same job headless")
    from ..__main__ import add_arguments

    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..__main__ import launch

    launch(args.image, model=args.model, device=args.device, headless=True if args.headless else None)
    return 0
