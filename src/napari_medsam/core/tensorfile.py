"""Our own files (a trained head, an adapter): tensors plus JSON metadata in one ``torch.save`` file.

Written atomically (a temporary file beside the target, then ``os.replace``), read with
``torch.load(weights_only=True)`` so no pickled code runs; every failure is a
:class:`~napari_medsam.core.errors.CheckpointError` that says which file and what to do. The metadata
record of each kind is a frozen dataclass over :class:`JsonMeta`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

from .errors import CheckpointError


class JsonMeta:
    """Base of a frozen dataclass stored as JSON in one of these files.

    ``from_json`` ignores keys it does not know (a newer version wrote them) and turns the JSON lists
    named in ``_TUPLES`` back into tuples.
    """

    _TUPLES: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("the metadata is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in raw.items() if k in names}
        for k in cls._TUPLES:
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


def save_tensor_file(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """``torch.save`` one of our own files (a head, an adapter) atomically: a temporary file beside
    ``path``, then ``os.replace``; returns the path."""
    import torch

    path = Path(os.fspath(path)).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_tensor_file(path: str | os.PathLike, *, what: str, written_by: str,
                     check_format: Callable[[Path, Any], None]) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Read one of our own files written by :func:`save_tensor_file` (``weights_only=True``: no pickled
    code runs): ``(path, payload, state)``, ``state`` checked to be a dict of tensors.

    ``what`` names the file in messages ("head", "adapter"), ``written_by`` says what writes one;
    ``check_format(path, format_marker)`` raises :class:`CheckpointError` on a marker it refuses,
    and must refuse ``None`` (no marker, or no dict at all).
    """
    import pickle

    import torch

    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{what} file not found: {p}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError,
            TypeError, AttributeError, UnicodeDecodeError) as e:  # torch's unpickler on arbitrary bytes
        raise CheckpointError(
            f"cannot read {p} as a napari-medsam {what} file ({type(e).__name__}: {e}); "
            f"it may be corrupt, or not {written_by}"
        ) from e
    check_format(p, payload.get("format") if isinstance(payload, dict) else None)
    state = payload.get("state")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p}: the {what} file's weights are malformed")
    return p, payload, state
