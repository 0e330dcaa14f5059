"""The ``napari-medsam`` command: the same core API as the widgets, for scripts and cohorts.

Each subcommand lives in its own module exposing ``register(subparsers)``; that function adds the
parser and sets ``func`` to a ``run(args) -> int`` callable. Heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__

SUBCOMMANDS = ("models", "embed", "segment", "heads", "bench", "gui")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="napari-medsam",
        description="Segment Anything for medical images: embed, segment, train prompt-free heads, predict.",
    )
    parser.add_argument("--version", action="version", version=f"napari-medsam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:  # a subcommand module not written yet
            if e.name == f"{__name__}.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..core.errors import MedSamError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MedSamError as e:
        print(f"napari-medsam {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"napari-medsam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
