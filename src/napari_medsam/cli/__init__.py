"""The ``napari-medsam`` command: the same core API as the widgets, for scripts and cohorts.

Each subcommand lives in its own module exposing ``register(subparsers)``; that function adds the
parser and sets ``func`` to a ``run(args) -> int`` callable. Heavy imports happen inside ``run``.

The error contract: a command either succeeds (exit 0) or prints exactly one line
``napari-medsam COMMAND: error: <what went wrong> — <what to do>`` on stderr and exits non-zero
(2 for a bad argument, 1 for anything else, 130 when interrupted). No traceback is shown unless
``--debug`` is given (anywhere on the command line) or ``NAPARI_MEDSAM_DEBUG=1`` is set; an
unexpected exception is reported the same way, with a hint to rerun with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__

SUBCOMMANDS = ("models", "embed", "segment", "heads", "predict", "suggest", "bench", "gui")

_DEBUG_HINT = "rerun with --debug for the traceback"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the contract above), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} — see `{self.prog} --help`\n")


def _one_line(text: object) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def _unexpected(e: BaseException) -> str:
    """The one-line report of an exception no layer turned into a MedSamError."""
    if isinstance(e, MemoryError):
        return (f"out of memory ({_one_line(e) or 'MemoryError'}) — use a smaller image or --slices, "
                "or a machine with more memory")
    if isinstance(e, OSError):
        name = f" {e.filename}" if getattr(e, "filename", None) else ""
        return (f"{type(e).__name__}{name}: {e.strerror or _one_line(e)} — check the path and its permissions "
                f"({_DEBUG_HINT})")
    return (f"unexpected {type(e).__name__}: {_one_line(e)} — this is a bug or an input we do not check yet; "
            f"{_DEBUG_HINT} and report it")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(
        prog="napari-medsam",
        description="Segment Anything for medical images: embed, segment, train prompt-free heads, predict.",
    )
    parser.add_argument("--version", action="version", version=f"napari-medsam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (may also follow the subcommand)")
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


def _split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Take ``--debug`` out of ``argv`` wherever it is (before a ``--``), so every subcommand has it."""
    out: list[str] = []
    debug = os.environ.get("NAPARI_MEDSAM_DEBUG", "") not in ("", "0")
    for i, a in enumerate(argv):
        if a == "--":
            out.extend(argv[i:])
            break
        if a == "--debug":
            debug = True
        else:
            out.append(a)
    return out, debug


def main(argv: Sequence[str] | None = None) -> int:
    from ..core.errors import MedSamError

    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prog = f"napari-medsam {args.command}"
    try:
        return int(args.func(args) or 0)
    except MedSamError as e:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the contract: one line, never a stack, unless --debug
        if debug:
            raise
        print(f"{prog}: error: {_unexpected(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
