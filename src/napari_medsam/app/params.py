"""The parameters the widgets, the CLI and scripts share, and the one place each fact comes from.

* :class:`ModelChoice` (which model, how it runs) and :class:`IntensityChoice` (raw values ->
  0-255); :func:`intensity_presets` lists the choices a user picks from, made from
  :data:`napari_medsam.core.preprocess.CT_WINDOWS` and ``MR_PERCENTILES``.
* :func:`head_kinds`: the trainable head families and what each is, from the head registry
  (:data:`napari_medsam.core.heads.HEADS`), the default first: a family added there appears in the
  widget and in ``napari-medsam train --head`` without another edit.
* :func:`availability`: whether a model's weights are here (or will download), one line why.
* :func:`parse_slices`: the one slice-list parser (``"3, 10-12"``).
* :func:`add_dataclass_arguments` / :func:`dataclass_kwargs`: argparse options made from a
  parameter dataclass (:class:`~napari_medsam.core.finetune.TrainParams`,
  :class:`~napari_medsam.core.propagation.PropagationParams`) with the dataclass's own defaults, so the
  command line and the widgets cannot drift from what the benchmarks ran.

Nothing here imports torch, Qt or napari.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.registry import DEFAULT_MODEL

__all__ = [
    "DEFAULT_HEAD",
    "IntensityChoice",
    "ModelChoice",
    "add_dataclass_arguments",
    "availability",
    "dataclass_kwargs",
    "head_kinds",
    "intensity_presets",
    "parse_slices",
]


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load and how (the Model widget's parameters; the CLI's ``--model`` & co.)."""

    name: str = DEFAULT_MODEL
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"


@dataclass(frozen=True)
class IntensityChoice:
    """How raw intensities map to the model's 0-255 input: ``auto``, ``ct`` (with a ``window``
    preset such as ``soft_tissue``), ``mr``, ``minmax`` or ``none``."""

    mode: str = "auto"
    window: str | None = None


def intensity_presets() -> dict[str, IntensityChoice]:
    """Label -> :class:`IntensityChoice`, ``auto`` first, one per CT window preset of the core."""
    from ..core.preprocess import CT_WINDOWS, MR_PERCENTILES

    out = {"auto": IntensityChoice("auto")}
    for name, (width, level) in CT_WINDOWS.items():
        out[f"CT {name.replace('_', ' ')} W{width:g} L{level:g}"] = IntensityChoice("ct", name)
    lo, hi = MR_PERCENTILES
    out[f"MR {lo:g}-{hi:g} %iles"] = IntensityChoice("mr")
    out["min-max"] = IntensityChoice("minmax")
    return out


#: The head family offered first. docs/benchmarks.md (few-shot heads): ``cnn`` was the most accurate
#: at 1 and 3 labelled slices and trains in seconds; ``autosam`` was slower and less accurate.
DEFAULT_HEAD = "cnn"


def head_kinds() -> dict[str, str]:
    """Head family -> one line describing it, from the registry, :data:`DEFAULT_HEAD` first."""
    from ..core.heads import HEAD_DESCRIPTIONS, HEADS

    kinds = sorted(HEADS, key=lambda k: (k != DEFAULT_HEAD, list(HEADS).index(k)))
    return {k: HEAD_DESCRIPTIONS.get(k, k) for k in kinds}


def availability(name: str, *, cache_dir: Any = None) -> tuple[bool, str]:
    """Whether model ``name`` can be loaded now (or downloaded when loaded), and a line saying why."""
    from ..core.registry import get_spec
    from ..core.weights import how_to_get, weights_available

    spec = get_spec(name)
    if spec.weights.random_init:
        return True, "random (tests and demos only)"
    found = weights_available(spec, cache_dir=cache_dir)
    if found is not None:
        if spec.weights.bundled_package and spec.weights.bundled_package in str(found).replace("-", "_"):
            return True, f"bundled with {spec.weights.bundled_package.replace('_', '-')}, offline"
        return True, f"found: {found.name} in {found.parent}"
    if spec.weights.url:
        size = f" ({spec.weights.size / 1e6:.0f} MB)" if spec.weights.size else ""
        return True, f"downloaded on first use{size} from {spec.weights.url}"
    return False, f"missing: {how_to_get(spec, cache_dir=cache_dir)}"


def parse_slices(text: str | None) -> list[int] | None:
    """``"3, 10-12"`` -> ``[3, 10, 11, 12]`` (sorted, each once; ``;`` separates too); empty or
    None -> None (every slice). Raises ValueError on anything else (negative numbers included)."""
    if text is None or not text.strip():
        return None
    out: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo_text, sep, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise ValueError(f"{part!r} is not a slice number or a range such as 10-12") from None
        if hi < lo:
            raise ValueError(f"range {part!r} runs backwards")
        out.update(range(lo, hi + 1))
    return sorted(out)


# ---- parameter dataclasses -> argparse -----------------------------------------------------------------


def _plain_type(tp: Any) -> tuple[type | None, bool]:
    """``int | None`` -> ``(int, True)``; ``bool`` -> ``(bool, False)``; anything else -> ``(None, ...)``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    base = args[0] if optional and len(args) == 1 else tp
    return (base if base in (int, float, bool, str) else None), optional


def add_dataclass_arguments(parser: Any, cls: type, helps: dict[str, str], *,
                            prefix: str = "", types: dict[str, Callable[[str], Any]] | None = None,
                            defaults: dict[str, str] | None = None) -> None:
    """One ``--option`` per field of ``cls`` named in ``helps`` (``batch_size`` -> ``--batch-size``).

    The default shown and used is the dataclass's: the option's value stays None unless given, and
    :func:`dataclass_kwargs` leaves such fields to the dataclass. A bool field that defaults to True
    becomes ``--no-<name>``; one that defaults to False ``--<name>``. ``types`` gives a field a
    validating parser (e.g. a positive int) instead of its plain type; ``defaults`` the words that
    describe a None default (``{default}`` in them is filled from other fields: ``{max_steps}``).
    ``parser`` may be an argument group.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in helps:
            continue
        base, _ = _plain_type(hints[f.name])
        if base is None:
            raise TypeError(f"{cls.__name__}.{f.name}: only int, float, str and bool fields become options")
        flag = prefix + f.name.replace("_", "-")
        default = f.default
        if base is bool:
            name = f"--no-{flag}" if default else f"--{flag}"
            parser.add_argument(name, dest=f.name, action="store_const", const=not default, default=None,
                                help=helps[f.name])
            continue
        if default is None:
            values = {g.name: g.default for g in dataclasses.fields(cls)}
            shown = (defaults or {}).get(f.name, "automatic").format(**values)
        else:
            shown = f"{default}"
        parser.add_argument(f"--{flag}", dest=f.name, type=(types or {}).get(f.name, base), default=None,
                            help=f"{helps[f.name]} (default: {shown})")


def dataclass_kwargs(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that ``args`` gives (not None), as keyword arguments for ``cls``."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}
