"""The Annotate widget's bookkeeping, without Qt: which prompt a preview belongs to, what was
written into which Labels layer (for Undo and as propagation seeds), and the seeds themselves.

* :func:`prompt_signature`: bytes that change whenever a slice's prompt changes, so a preview
  computed for an older prompt is recognised and dropped.
* :class:`EditLog`: the undo stack of commits and propagations (weak references to the Labels
  layers, so a removed layer's edits are skipped) and, per ``(labels layer, label id, slice
  axis)``, the slices the user committed or propagated: they seed the next propagation and are
  never overwritten by it.
* :func:`propagation_seeds`: the prompts a propagation of one class starts from.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .. import _layers

__all__ = ["EditLog", "prompt_signature", "propagation_seeds"]


def prompt_signature(prompt: Any) -> bytes:
    """Bytes identifying a :class:`~napari_medsam.core.segment.Prompt2D` (``b""`` for None)."""
    if prompt is None:
        return b""
    parts = [np.asarray(prompt.points, np.float32).tobytes(), np.asarray(prompt.labels, np.int64).tobytes(),
             np.asarray(prompt.box if prompt.box is not None else (), np.float32).tobytes()]
    return b"|".join(parts)


class EditLog:
    """Edits written into Labels layers, newest last, and the slices committed per class and axis."""

    def __init__(self) -> None:
        self._edits: list[tuple[weakref.ref, _layers.LabelEdit]] = []
        self._committed: dict[tuple[int, int, int], set[int]] = {}

    def __len__(self) -> int:
        return len(self._edits)

    @property
    def last(self) -> _layers.LabelEdit | None:
        return self._edits[-1][1] if self._edits else None

    def record(self, labels: Any, label_id: int, axis: int, slices: Iterable[int],
               edit: _layers.LabelEdit | None) -> None:
        """``slices`` of ``labels`` now hold class ``label_id`` (``edit``: what changed, None if nothing)."""
        if edit is not None:
            self._edits.append((weakref.ref(labels), edit))
        self._committed.setdefault((id(labels), int(label_id), int(axis)), set()).update(int(z) for z in slices)

    def committed(self, labels: Any, label_id: int, axis: int) -> set[int]:
        return set(self._committed.get((id(labels), int(label_id), int(axis)), ()))

    def undo(self, usable: Callable[[Any], bool]) -> _layers.LabelEdit | None:
        """Undo the newest edit whose layer still exists and is ``usable`` (in the viewer); those
        slices are no longer committed. Returns the edit, or None when there is nothing to undo."""
        while self._edits:
            ref, edit = self._edits.pop()
            labels = ref()
            if labels is None or not usable(labels):
                continue
            _layers.undo_edit(labels, edit)
            for key, slices in self._committed.items():
                if key[0] == id(labels) and key[1] == edit.label_id:
                    slices.difference_update(edit.slices)
            return edit
        return None

    def forget(self, layer: Any) -> None:
        """Drop the edits of a removed layer (and of layers already gone)."""
        self._edits = [(ref, e) for ref, e in self._edits if ref() is not None and ref() is not layer]


def propagation_seeds(points: Any, shapes: Any, image: Any, view: _layers.SliceView, labels: Any,
                      label_id: int, committed: Iterable[int]) -> tuple[dict[int, Any], set[int]]:
    """The prompts a propagation of class ``label_id`` starts from, and the slices it must not write.

    Every slice holding prompts gives its prompt; every ``committed`` slice where ``labels`` holds
    the class gives the box around it (a prompt on the same slice wins). With neither, the class
    on the slice under view seeds it. Returns ``({slice: Prompt2D}, slices to keep as they are)``.
    """
    from ..core.segment import Prompt2D, box_of

    seeds: dict[int, Any] = {}
    for z in _layers.prompted_slices(points, shapes, image, view):
        p = _layers.slice_prompt(points, shapes, image, _layers.with_index(view, z))
        if p is not None:
            seeds[z] = p
    kept: set[int] = set()
    if labels is not None:
        for z in sorted(committed):
            box = box_of(_layers.label_mask(labels, _layers.with_index(view, z), label_id))
            if box is not None:
                kept.add(z)
                seeds.setdefault(z, Prompt2D.from_box(box))
        if not seeds:
            box = box_of(_layers.label_mask(labels, view, label_id))
            if box is not None:
                seeds[view.index] = Prompt2D.from_box(box)
                kept.add(view.index)
    return seeds, kept
