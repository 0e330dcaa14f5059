"""Pieces every subcommand shares: model/device options, progress bars, output writing."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def add_model_args(p: argparse.ArgumentParser, *, default_model: str = "litemedsam") -> None:
    p.add_argument("--model", default=default_model, help=f"registered model name (default {default_model}); "
                   "see `napari-medsam models`")
    p.add_argument("--weights", default=None, help="a checkpoint file to use instead of the registered weights")
    add_runtime_args(p)
    p.add_argument("--trust-weights", action="store_true",
                   help="vouch for a weights file in the weights folder that has no published checksum "
                        "(MedSAM, MobileSAM): its SHA-256 is recorded and checked from then on")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Where and how a model runs and where its embeddings go: ``--device``, ``--precision``,
    ``--cache-dir``, ``--no-disk-cache`` (also for commands whose model a head file names)."""
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, mps or cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision (auto: bf16/fp16 on GPUs and bf16-capable CPUs, else fp32)")
    p.add_argument("--cache-dir", default=None,
                   help="cache folder for embeddings and weights (default: the user cache directory)")
    p.add_argument("--no-disk-cache", action="store_true", help="keep embeddings in memory only")


def _number(text: str, kind: type, *, low: float, low_ok: bool) -> Any:
    name = "a whole number" if kind is int else "a number"
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
    if not math.isfinite(value) or value < low or (value == low and not low_ok):
        bound = f">= {low:g}" if low_ok else f"> {low:g}"
        raise argparse.ArgumentTypeError(f"needs {name} {bound} (finite), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0 (learning rates, sizes)."""
    return _number(text, float, low=0.0, low_ok=False)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (epochs, batch sizes)."""
    return _number(text, int, low=1, low_ok=True)


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0 (patience, thread counts where 0 means 'default')."""
    return _number(text, int, low=0, low_ok=True)


def axis_arg(text: str) -> int:
    """argparse type of ``--axis``: 0, 1 or 2 (or -3..-1); a 2D image has one slice whatever the axis."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an axis: use 0, 1 or 2") from None
    if not -3 <= value <= 2:
        raise argparse.ArgumentTypeError(f"a volume has axes 0, 1 and 2, got {value}")
    return value


def window_arg(text: str) -> str | tuple[float, float]:
    """argparse type of ``--window``: a preset name or ``WIDTH,LEVEL`` in HU (finite, width > 0)."""
    from ..core.preprocess import CT_WINDOWS

    if "," not in text:
        if text not in CT_WINDOWS:
            raise argparse.ArgumentTypeError(
                f"unknown window {text!r}: use one of {', '.join(CT_WINDOWS)} or WIDTH,LEVEL, e.g. 400,40")
        return text
    parts = text.split(",")
    try:
        width, level = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window WIDTH,LEVEL needs two numbers, e.g. 400,40; got {text!r}") from None
    if not (math.isfinite(width) and math.isfinite(level) and width > 0):
        raise argparse.ArgumentTypeError(f"--window WIDTH,LEVEL needs finite numbers and WIDTH > 0, got {text!r}")
    return (width, level)


def add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--axis", type=axis_arg, default=0,
                   help="array axis to take 2D slices along (default 0), in the array order as read; "
                        "for NIfTI that is nibabel's (i, j, k) voxel order")
    p.add_argument("--intensity", default="auto", choices=("auto", "ct", "mr", "minmax", "none"),
                   help="intensity mapping: CT window, MR percentile clipping, min-max, or none (auto detects)")
    p.add_argument("--window", type=window_arg, default=None,
                   help="CT window: soft_tissue, lung, bone, brain, or WIDTH,LEVEL in HU (implies --intensity ct)")


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (never an input, a read-only file or a non-zarr folder)")


def check_outputs(args: argparse.Namespace, outputs: Any, inputs: Any, *, kind: str = "image") -> None:
    """Refuse, before any work, outputs that would destroy an input or an existing file (without
    ``--overwrite``) or cannot be written (see :func:`napari_medsam.io.writers.check_output`)."""
    from ..io.writers import check_output

    inputs = [i for i in inputs if i]
    for out in outputs:
        check_output(out, inputs=inputs, overwrite=bool(getattr(args, "overwrite", False)), kind=kind)


def load_from_args(args: argparse.Namespace) -> Any:
    from ..core.build import load_model
    from ..core.speed import configure_runtime

    configure_runtime()  # threads by free cores, allocator without page-fault storms (docs/benchmarks.md)

    bar = _DownloadBar()
    try:
        return load_model(args.model, weights=args.weights, device=args.device, precision=args.precision,
                          cache_dir=args.cache_dir, progress=bar,
                          trust_weights=bool(getattr(args, "trust_weights", False)))
    finally:
        bar.close()


def cache_from_args(args: argparse.Namespace) -> Any:
    from ..core.embeddings import EmbeddingCache

    root = None if args.cache_dir is None else Path(args.cache_dir) / "embeddings"
    return EmbeddingCache(root, disk=not args.no_disk_cache)


def intensity_from_args(args: argparse.Namespace, volume: Any, axis: int) -> Any:
    from ..core.preprocess import compute_intensity

    window: Any = args.window
    if isinstance(window, str):  # set programmatically, not parsed
        window = window_arg(window)
    mode = "ct" if window is not None and args.intensity == "auto" else args.intensity
    return compute_intensity(volume.data, mode, window=window, axis=axis, rgb=volume.rgb)


def encoder_from_args(args: argparse.Namespace, loaded: Any, volume: Any) -> Any:
    from ..core.encoder import VolumeEncoder

    axis = getattr(args, "axis", 0)
    return VolumeEncoder(loaded, volume, axis=axis, intensity=intensity_from_args(args, volume, axis),
                         cache=cache_from_args(args))


class _DownloadBar:
    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total or None, unit="B", unit_scale=True, desc="download", file=sys.stderr)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_with_progress(gen: Generator[Any, None, T], desc: str, *, unit: str = "slice",
                      announce: Mapping[str, str] | None = None) -> T:
    """Drain a core progress generator, drawing a tqdm bar on stderr; return its result.

    The numbers and words in each step's ``info`` show after the bar; ``announce``: ``{key: label}``
    of info values printed once, on their own line (``label: value``), instead.
    """
    from tqdm import tqdm

    announce = announce or {}
    shown: set[str] = set()
    bar = None
    try:
        while True:
            try:
                prog = next(gen)
            except StopIteration as stop:
                return stop.value
            for key, label in announce.items():
                if prog.info.get(key) and key not in shown:
                    print(f"{label}: {prog.info[key]}", file=sys.stderr)
                    shown.add(key)
            if bar is None:
                bar = tqdm(total=prog.total or None, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
            if prog.total and bar.total != prog.total:
                bar.total = prog.total
            post = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in prog.info.items()
                    if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k not in announce}
            if post:
                bar.set_postfix(post, refresh=False)
            bar.update(prog.step - bar.n)
    finally:
        if bar is not None:
            bar.close()
        gen.close()


def slices_arg(text: str) -> str:
    """argparse type of ``--slices``: checked when parsed (before any work), kept as text for
    :func:`parse_int_list`."""
    from ..app.params import parse_slices

    try:
        parse_slices(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; give indices like 3,17,40 or ranges like 10-20") from None
    return text


def parse_int_list(text: str | None) -> list[int] | None:
    """``"3,17,40"`` -> ``[3, 17, 40]``; ranges ``"10-20"`` too: the widgets' parser
    (:func:`napari_medsam.app.params.parse_slices`: sorted, each once), with a CLI error message."""
    from ..app.params import parse_slices
    from ..core.errors import MedSamError

    try:
        return parse_slices(text)
    except ValueError as e:
        raise MedSamError(f"slice list {text!r}: {e} — give indices like 3,17,40 or ranges like 10-20") from None
