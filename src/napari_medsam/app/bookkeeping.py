"""What an annotation session remembers about the labels, without Qt or napari.

* :class:`SliceView`: one 2D slice of a volume (which axis, which index, which axes are rows and
  columns): the unit every prompt, preview, commit and propagation works on.
* :func:`paint_masks`, :func:`undo_edit`, :func:`label_mask`: masks -> a labels target and back.
  A *target* is anything with ``data`` (an integer array) and ``data_setitem(indices, value)``:
  a napari Labels layer, or :class:`ArrayLabels` around a plain array (scripts, the CLI, tests).
  Writes never touch other labels: a mask is written only where the labels are 0.
* :func:`replace_slices`: one edit that erases a class's earlier proposals and writes new masks.
* :class:`EditLog`: the undo stack of commits and propagations (weak references to the targets,
  so a removed layer's edits are skipped) and, per ``(target, label id, slice axis)``, the
  *reviewed* slices (committed, restored, painted or accepted by the user: they seed the next
  propagation and are never overwritten by it) and the *proposals* (written by a propagation and
  not reviewed since: the next propagation of the class replaces them). The same notion as the
  active-learning loop's (:mod:`napari_medsam.app.loop`): a slice is a proposal until the user
  reviews it.
* :func:`prompt_signature`: bytes that change whenever a slice's prompt changes, so a preview
  computed for an older prompt is recognised and dropped.
* :func:`seeds_from_labels`: the prompts a propagation of one class starts from.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ArrayLabels",
    "EditLog",
    "LabelEdit",
    "SliceView",
    "label_mask",
    "paint_masks",
    "prompt_signature",
    "replace_slices",
    "seeds_from_labels",
    "undo_edit",
    "volume_view",
    "with_index",
]


@dataclass(frozen=True)
class SliceView:
    """The 2D slice of a volume under view (or being worked on).

    ``axis``: the data axis being sliced (0 for a 2D image); ``index``: the slice along it;
    ``is_3d``: the image has three spatial axes; ``rc_axes``: the data axes that are the slice's
    rows and columns, in array order (the order the core's slices use).
    """

    axis: int
    index: int
    is_3d: bool
    rc_axes: tuple[int, int]
    n_slices: int = 1

    def region(self, ndim: int) -> tuple[Any, ...]:
        """An index into a ``ndim``-D spatial array selecting this slice."""
        if not self.is_3d:
            return (slice(None),) * ndim
        key: list[Any] = [slice(None)] * ndim
        key[self.axis] = self.index
        return tuple(key)


def with_index(view: SliceView, index: int) -> SliceView:
    return dataclasses.replace(view, index=int(index))


def volume_view(shape: tuple[int, ...], axis: int = 0, index: int = 0) -> SliceView:
    """The :class:`SliceView` of slice ``index`` along ``axis`` of a 2D or 3D spatial ``shape``."""
    if len(shape) == 2:
        return SliceView(axis=0, index=0, is_3d=False, rc_axes=(0, 1), n_slices=1)
    rc = tuple(a for a in range(3) if a != axis)
    return SliceView(axis=int(axis), index=int(index), is_3d=True, rc_axes=(rc[0], rc[1]),
                     n_slices=int(shape[axis]))


class ArrayLabels:
    """A labels target over a plain integer array (what a napari Labels layer is to the widgets)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def data_setitem(self, indices: tuple[np.ndarray, ...], value: Any) -> None:
        self.data[indices] = value


@dataclass
class LabelEdit:
    """What a commit or a propagation changed in a labels target, to undo it.

    ``values``: what was written at each index (None: ``label_id`` everywhere); ``proposals``: the
    slices where it wrote or erased proposals (a propagation's, not reviewed)."""

    description: str
    indices: tuple[np.ndarray, ...]
    previous: np.ndarray
    label_id: int
    slices: tuple[int, ...] = field(default_factory=tuple)
    axis: int = 0
    values: np.ndarray | None = None
    proposals: tuple[int, ...] = ()

    @property
    def n_voxels(self) -> int:
        return int(self.indices[0].size) if self.indices else 0


def _full_indices(view: SliceView, rc_nonzero: tuple[np.ndarray, np.ndarray], ndim: int) -> tuple[np.ndarray, ...]:
    rows, cols = rc_nonzero
    if not view.is_3d:
        return (rows, cols)
    out: list[np.ndarray] = [np.empty(0, np.intp)] * ndim
    out[view.axis] = np.full(rows.shape, view.index, dtype=np.intp)
    out[view.rc_axes[0]] = rows
    out[view.rc_axes[1]] = cols
    return tuple(out)


def paint_masks(target: Any, view: SliceView, masks: Mapping[int, np.ndarray], label_id: int, *,
                description: str = "commit") -> LabelEdit | None:
    """Write ``label_id`` where each slice's mask is set and the label is 0 (other labels stay).

    ``masks`` maps slice indices along ``view.axis`` to ``(H, W)`` bool masks. Goes through
    ``target.data_setitem`` (for a napari Labels layer: its own undo history and partial refresh).
    Returns the edit for :func:`undo_edit`, or None when nothing changed.
    """
    data = target.data
    ndim = data.ndim
    parts: list[tuple[np.ndarray, ...]] = []
    for z, mask in sorted(masks.items()):
        v = with_index(view, z)
        current = np.asarray(data[v.region(ndim)])
        if current.shape != mask.shape:
            raise ValueError(f"mask of shape {mask.shape} does not fit slice of shape {current.shape}")
        write = np.asarray(mask, dtype=bool) & (current == 0)
        if write.any():
            parts.append(_full_indices(v, np.nonzero(write), ndim))
    if not parts:
        return None
    indices = tuple(np.concatenate([p[d] for p in parts]) for d in range(ndim))
    previous = np.array(data[indices], copy=True)
    target.data_setitem(indices, int(label_id))
    return LabelEdit(description=description, indices=indices, previous=previous, label_id=int(label_id),
                     slices=tuple(sorted(int(z) for z in masks)), axis=int(view.axis))


def replace_slices(target: Any, view: SliceView, write: Mapping[int, np.ndarray], clear: Iterable[int],
                   label_id: int, *, description: str = "propagate", proposals: Iterable[int] = ()) -> LabelEdit | None:
    """One edit: erase ``label_id`` on the ``clear`` slices (an earlier propagation's proposals),
    then write each mask of ``write`` where the labels are 0 (other classes stay, as in
    :func:`paint_masks`). ``proposals``: the slices where proposals are written or erased
    (recorded in the edit). Returns the edit for :func:`undo_edit` (which also brings erased voxels back), or None."""
    data = target.data
    ndim = data.ndim
    clear = {int(z) for z in clear}
    parts: list[tuple[np.ndarray, ...]] = []
    old_parts: list[np.ndarray] = []
    new_parts: list[np.ndarray] = []
    for z in sorted(clear | {int(k) for k in write}):
        v = with_index(view, z)
        current = np.asarray(data[v.region(ndim)])
        new = current.copy()
        if z in clear:
            new[new == label_id] = 0
        mask = write.get(z)
        if mask is not None:
            if mask.shape != current.shape:
                raise ValueError(f"mask of shape {mask.shape} does not fit slice of shape {current.shape}")
            new[np.asarray(mask, bool) & (new == 0)] = label_id
        changed = np.nonzero(new != current)
        if changed[0].size:
            parts.append(_full_indices(v, changed, ndim))
            old_parts.append(current[changed])
            new_parts.append(new[changed])
    if not parts:
        return None
    indices = tuple(np.concatenate([p[d] for p in parts]) for d in range(ndim))
    values = np.concatenate(new_parts)
    target.data_setitem(indices, values)
    return LabelEdit(description=description, indices=indices, previous=np.concatenate(old_parts),
                     label_id=int(label_id), slices=tuple(sorted(clear | {int(k) for k in write})),
                     axis=int(view.axis), values=values, proposals=tuple(sorted(int(z) for z in proposals)))


def undo_edit(target: Any, edit: LabelEdit) -> None:
    """Put back what :func:`paint_masks` or :func:`replace_slices` changed (voxels the user
    repainted since stay as they are)."""
    data = target.data
    still = np.asarray(data[edit.indices]) == (edit.label_id if edit.values is None else edit.values)
    if not still.any():
        return
    idx = tuple(i[still] for i in edit.indices)
    target.data_setitem(idx, edit.previous[still])


def label_mask(target: Any, view: SliceView, label_id: int) -> np.ndarray:
    """``(H, W)`` bool: where the slice ``view`` of the target holds ``label_id``."""
    data = target.data
    return np.asarray(data[view.region(data.ndim)]) == int(label_id)


def prompt_signature(prompt: Any) -> bytes:
    """Bytes identifying a :class:`~napari_medsam.core.segment.Prompt2D` (``b""`` for None)."""
    if prompt is None:
        return b""
    parts = [np.asarray(prompt.points, np.float32).tobytes(), np.asarray(prompt.labels, np.int64).tobytes(),
             np.asarray(prompt.box if prompt.box is not None else (), np.float32).tobytes()]
    return b"|".join(parts)


class EditLog:
    """Edits written into labels targets, newest last, and per class and axis the slices reviewed
    (``committed``) and the slices proposed by a propagation and not reviewed since (``proposed``)."""

    def __init__(self) -> None:
        self._edits: list[tuple[weakref.ref, LabelEdit, dict[tuple[int, int, int], set[int]]]] = []
        self._committed: dict[tuple[int, int, int], set[int]] = {}
        self._proposed: dict[tuple[int, int, int], set[int]] = {}

    def __len__(self) -> int:
        return len(self._edits)

    @property
    def last(self) -> LabelEdit | None:
        return self._edits[-1][1] if self._edits else None

    def record(self, target: Any, label_id: int, axis: int, slices: Iterable[int], edit: LabelEdit | None, *,
               proposals: Iterable[int] | None = None) -> None:
        """``slices`` of ``target`` now hold class ``label_id``, reviewed (``edit``: what changed,
        None if nothing). ``proposals``: with a propagation, the slices that are now its class's
        proposals (they replace the earlier ones; None: the proposals stay, less ``slices``)."""
        key = (id(target), int(label_id), int(axis))
        before = {k: set(v) for k, v in self._proposed.items() if k[0] == id(target)}
        if edit is not None:
            self._edits.append((weakref.ref(target), edit, before))
        done = {int(z) for z in slices}
        self._committed.setdefault(key, set()).update(done)
        prop = self._proposed.setdefault(key, set())
        if proposals is not None:
            prop.clear()
            prop.update(int(z) for z in proposals)
        prop.difference_update(self._committed[key])

    def committed(self, target: Any, label_id: int, axis: int) -> set[int]:
        """The reviewed slices of class ``label_id``: they seed propagation and are never overwritten."""
        return set(self._committed.get((id(target), int(label_id), int(axis)), ()))

    def proposed(self, target: Any, label_id: int, axis: int) -> set[int]:
        """Slices a propagation of class ``label_id`` wrote that nobody reviewed since."""
        return set(self._proposed.get((id(target), int(label_id), int(axis)), ()))

    def review(self, target: Any, axis: int, slices: Iterable[int]) -> set[int]:
        """The user painted, erased or accepted ``slices``: every class's proposal there is reviewed
        now (it seeds the next propagation and is not replaced). Returns the slices that were proposals."""
        done = {int(z) for z in slices}
        hit: set[int] = set()
        for key, prop in self._proposed.items():
            if key[0] == id(target) and key[2] == int(axis):
                now = prop & done
                if now:
                    hit |= now
                    prop.difference_update(now)
                    self._committed.setdefault(key, set()).update(now)
        return hit

    def undo(self, usable: Callable[[Any], bool] = lambda _t: True) -> tuple[Any, LabelEdit] | None:
        """Undo the newest edit whose target still exists and is ``usable`` (e.g. still in the
        viewer); those slices are no longer committed. Returns ``(target, edit)``, or None when
        there is nothing to undo."""
        while self._edits:
            ref, edit, proposed_before = self._edits.pop()
            target = ref()
            if target is None or not usable(target):
                continue
            undo_edit(target, edit)
            for key, slices in self._committed.items():
                if key[0] == id(target) and key[1] == edit.label_id:
                    slices.difference_update(edit.slices)
            for key in [k for k in self._proposed if k[0] == id(target)]:
                del self._proposed[key]
            self._proposed.update({k: set(v) for k, v in proposed_before.items()})
            return target, edit
        return None

    def forget(self, target: Any) -> None:
        """Drop the edits of a removed target (and of targets already gone) and its committed slices."""
        self._edits = [e for e in self._edits if e[0]() is not None and e[0]() is not target]
        for book in (self._committed, self._proposed):
            for key in [k for k in book if k[0] == id(target)]:
                del book[key]


def seeds_from_labels(prompts: Mapping[int, Any], target: Any, view: SliceView, label_id: int,
                      committed: Iterable[int]) -> tuple[dict[int, Any], set[int]]:
    """The prompts a propagation of class ``label_id`` starts from, and the slices it must not write.

    ``prompts``: ``{slice: Prompt2D}`` the user placed (they win on their slice). Every
    ``committed`` slice where ``target`` holds the class gives the box around it, with the class's
    mask there as the prompt's ``known`` mask (the run carries from what the person committed or
    corrected, not from the decoder's reading of the box). With neither, the class on the slice
    ``view`` seeds it the same way. Returns ``({slice: Prompt2D}, slices to keep as they are)``.
    """
    from ..core.segment import Prompt2D, box_of

    seeds: dict[int, Any] = {int(z): p for z, p in prompts.items() if p is not None}
    kept: set[int] = set()
    if target is not None:
        for z in sorted(committed):
            mask = label_mask(target, with_index(view, z), label_id)
            box = box_of(mask)
            if box is not None:
                kept.add(z)
                seeds.setdefault(z, Prompt2D(box=box, known=mask))
        if not seeds:
            mask = label_mask(target, view, label_id)
            box = box_of(mask)
            if box is not None:
                seeds[view.index] = Prompt2D(box=box, known=mask)
                kept.add(view.index)
    return seeds, kept
