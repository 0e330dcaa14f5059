"""The active-learning correction loop: reviewed slices, proposals, rounds and what to review next.

GUI-free (psygnal, numpy; torch only inside a round). A :class:`ReviewLoop` holds

- ``labels``: the user's truth, the array the labels layer shows (not copied: edits land in it);
- the *reviewed* slices per axis: a slice is reviewed once the user edited it, committed a prompt
  on it, accepted its proposal or marked it; only reviewed slices are ever trained on;
- ``proposals``: prompt-free predictions of the current head, written for unreviewed slices only
  (a reviewed slice's proposal is cleared, and the labels are never written by a round);
- the rounds: each trained head (warm-started from the previous round's), its metrics and time.

A round (:meth:`ReviewLoop.round_steps`, a generator for a thread worker) trains on a snapshot of
the reviewed slices taken when it starts, then predicts the unreviewed slices nearest the slice in
view first, yielding :class:`~napari_medsam.core.progress.Progress` whose ``info["slices"]`` names
the proposals just written. Slices the user reviews while the round runs are skipped from then on.
Per round it measures how much the user had to change the previous round's proposals on the
slices reviewed since (``proposal_dice``, ``voxels_changed``) and a cross-validated Dice over the
reviewed slices (``cv_dice``: k folds of fresh heads on the cached embeddings).

Signals are emitted on the thread that calls the method (:meth:`round_steps` runs in a worker:
the dock reacts to the worker's ``yielded``/``returned`` callbacks instead).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from psygnal import Signal

from ..core.errors import InvalidImageError, MedSamError
from ..core.finetune import TrainParams
from ..core.progress import Progress, ProgressGen
from ..core.uncertainty import (
    DEFAULT_SCORE,
    DEFAULT_STRATEGY,
    check_strategy,
    coverage_ranking,
    disagreement_score,
    foreground_extent,
    rank_slices,
    slice_scores,
)

__all__ = ["ReviewLoop", "RoundParams", "RoundRecord", "dice_score"]


@dataclass(frozen=True)
class RoundParams:
    """How a round trains, predicts and scores.

    ``train``: the head's training (``train.head`` is the family; a previous round's head of the
    same family and axis is continued when ``warm_start``); ``strategy``: how the suggestions
    rank (:data:`~napari_medsam.core.uncertainty.STRATEGIES`: ``coverage`` or one score; ``tta``
    costs four more head passes per slice); ``cv_folds``: folds of the cross-validated Dice (0 or 1: none;
    fewer reviewed slices than folds: leave-one-out), each a fresh head trained for
    ``cv_max_steps`` steps; ``batch_size``: slices per prediction batch; ``candidates``: the
    slices to predict (None: every unreviewed slice); ``min_gap``: suggestions at least this many
    slices apart.
    """

    train: TrainParams = TrainParams()
    warm_start: bool = True
    strategy: str = DEFAULT_STRATEGY
    cv_folds: int = 3
    cv_max_steps: int = 60
    batch_size: int = 8
    candidates: tuple[int, ...] | None = None
    min_gap: int = 2


@dataclass(frozen=True, eq=False)
class RoundRecord:
    """One finished round: its head (a TrainedHead), the slices it trained on, its metrics."""

    index: int
    head: Any
    axis: int
    reviewed: tuple[int, ...]
    metrics: dict[str, Any] = field(default_factory=dict)
    timestamp: str = ""


def dice_score(pred: np.ndarray, truth: np.ndarray, class_ids: Iterable[int] | None = None) -> float:
    """Dice per class pooled over the arrays, averaged over the classes present in either (NaN: none)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    ids = sorted({int(c) for c in (class_ids if class_ids is not None else
                                   set(np.unique(pred)) | set(np.unique(truth))) if c != 0})
    vals = []
    for c in ids:
        p, t = pred == c, truth == c
        s = int(p.sum()) + int(t.sum())
        if s:
            vals.append(2.0 * int((p & t).sum()) / s)
    return float(np.mean(vals)) if vals else math.nan


def _key(ndim: int, axis: int, index: int) -> tuple:
    key: list[Any] = [slice(None)] * ndim
    key[axis] = int(index)
    return tuple(key)


class ReviewLoop:
    """Reviewed slices, proposals and rounds over one labels array (see the module docstring).

    ``labels``: integer array of the image's spatial shape (3D), used in place; ``axis``: the
    slice axis rounds train and predict along; ``class_names``: ``{label id: name}``;
    ``auto_every``: emit :attr:`round_due` once this many slices were newly reviewed since the
    last round (0: never; running the round is the caller's job); ``init_head``: a head to
    continue in the first round (e.g. one trained in the Fine-tune dock).
    """

    reviewed_changed = Signal(object)   # sorted tuple of the reviewed slices on the loop's axis
    proposals_changed = Signal(object)  # tuple of slices whose proposal changed (outside rounds)
    labels_changed = Signal(object)     # tuple of slices whose labels the loop wrote (accepted)
    round_finished = Signal(object)     # RoundRecord
    round_due = Signal(int)             # newly reviewed slices since the last round
    changed = Signal()                  # anything an autosave should store

    def __init__(self, labels: np.ndarray, *, axis: int = 0, class_names: Mapping[int, str] | None = None,
                 auto_every: int = 0, init_head: Any = None, proposals: np.ndarray | None = None) -> None:
        if not isinstance(labels, np.ndarray) or labels.ndim != 3 or labels.dtype.kind not in "biu":
            raise InvalidImageError("the review loop needs a 3D integer labels array (0 background)")
        if not -3 <= axis < 3:
            raise InvalidImageError(f"axis must be 0, 1 or 2, got {axis}")
        self.labels = labels
        self.axis = axis % 3
        if proposals is None:
            proposals = np.zeros_like(labels)
        elif proposals.shape != labels.shape:
            raise InvalidImageError(f"proposals of shape {proposals.shape} for labels of shape {labels.shape}")
        self.proposals = proposals
        self.class_names: dict[int, str] = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.auto_every = int(auto_every)
        self.init_head = init_head
        self.rounds: list[RoundRecord] = []
        self.scores: dict[str, np.ndarray] = {}
        self.new_since_round = 0
        self._reviewed: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
        self._proposed: set[int] = set()          # slices (on self.axis) holding a proposal
        self._pending: dict[int, np.ndarray] = {}  # slice -> the proposal it had when it became reviewed
        self._lock = threading.RLock()

    # -- state ------------------------------------------------------------------------------------
    @property
    def n_slices(self) -> int:
        return int(self.labels.shape[self.axis])

    def reviewed(self, axis: int | None = None) -> tuple[int, ...]:
        """The reviewed slices along ``axis`` (default: the loop's), sorted."""
        with self._lock:
            return tuple(sorted(self._reviewed[self.axis if axis is None else axis % 3]))

    def is_reviewed(self, index: int) -> bool:
        with self._lock:
            return int(index) in self._reviewed[self.axis]

    @property
    def proposed(self) -> tuple[int, ...]:
        """The slices that hold a proposal (never a reviewed one), sorted."""
        with self._lock:
            return tuple(sorted(self._proposed))

    @property
    def head(self) -> Any:
        """The latest round's head (or ``init_head`` before the first round)."""
        return self.rounds[-1].head if self.rounds else self.init_head

    def _sl(self, index: int, axis: int | None = None) -> tuple:
        return _key(3, self.axis if axis is None else axis, index)

    def _check(self, index: int, axis: int) -> int:
        i = int(index)
        if not 0 <= i < self.labels.shape[axis]:
            raise InvalidImageError(f"slice {i} is outside 0..{self.labels.shape[axis] - 1} along axis {axis}")
        return i

    # -- verbs ------------------------------------------------------------------------------------
    def mark_reviewed(self, slices: Iterable[int], axis: int | None = None) -> tuple[int, ...]:
        """Mark slices reviewed (their proposal is cleared); returns the newly reviewed ones."""
        ax = self.axis if axis is None else axis % 3
        idx = [self._check(s, ax) for s in slices]
        new: list[int] = []
        cleared: list[int] = []
        with self._lock:
            for s in idx:
                if s in self._reviewed[ax]:
                    continue
                self._reviewed[ax].add(s)
                new.append(s)
                if ax == self.axis and s in self._proposed:
                    self._pending[s] = np.array(self.proposals[self._sl(s)])
                    self.proposals[self._sl(s)] = 0
                    self._proposed.discard(s)
                    cleared.append(s)
                elif ax == self.axis:
                    self._pending.pop(s, None)
            if ax == self.axis:
                self.new_since_round += len(new)
            due = ax == self.axis and bool(new) and 0 < self.auto_every <= self.new_since_round
        if new:
            self.reviewed_changed.emit(self.reviewed())
        if cleared:
            self.proposals_changed.emit(tuple(cleared))
        if new:
            self.changed.emit()
        if due:
            self.round_due.emit(self.new_since_round)
        return tuple(new)

    def unmark_reviewed(self, slices: Iterable[int], axis: int | None = None) -> tuple[int, ...]:
        """Take slices out of the reviewed (training) set; their labels stay as they are."""
        ax = self.axis if axis is None else axis % 3
        with self._lock:
            gone = tuple(int(s) for s in slices if int(s) in self._reviewed[ax])
            self._reviewed[ax].difference_update(gone)
            for s in gone:
                self._pending.pop(s, None)
        if gone:
            self.reviewed_changed.emit(self.reviewed())
            self.changed.emit()
        return gone

    def on_user_edit(self, slices: Iterable[int], axis: int | None = None) -> None:
        """The user painted, filled, erased or committed a prompt on ``slices``: they are reviewed."""
        new = self.mark_reviewed(slices, axis)
        if not new:
            self.changed.emit()  # labels changed on reviewed slices: still worth saving

    def accept(self, index: int) -> bool:
        """Copy the proposal of an unreviewed slice into the labels; it becomes reviewed. False if
        the slice is reviewed already or holds no proposal."""
        s = self._check(index, self.axis)
        with self._lock:
            if s in self._reviewed[self.axis] or s not in self._proposed:
                return False
            self.labels[self._sl(s)] = self.proposals[self._sl(s)]
        self.labels_changed.emit((s,))
        self.mark_reviewed([s])
        return True

    def accept_range(self, start: int, stop: int) -> tuple[int, ...]:
        """Accept the proposals of every unreviewed slice from ``start`` to ``stop`` (both included)."""
        a, b = sorted((int(start), int(stop)))
        return tuple(s for s in range(max(0, a), min(self.n_slices - 1, b) + 1) if self.accept(s))

    def suggest(self, n: int = 5, *, strategy: str | None = None, min_gap: int = 2) -> list[tuple[int, float]]:
        """The next slices to review: ``(slice, score)`` in the order to review them, reviewed ones excluded.

        ``strategy`` (default :data:`~napari_medsam.core.uncertainty.DEFAULT_STRATEGY`):
        ``coverage`` splits the largest gap between reviewed slices inside the predicted foreground
        first (the score shown is the slice's entropy); a score name ranks by that score alone,
        most uncertain first. ``disagreement`` needs two rounds' proposals of a slice; until any
        exists, ``entropy`` ranks.
        """
        name = check_strategy(strategy or DEFAULT_STRATEGY)
        with self._lock:
            values = self.scores.get(DEFAULT_SCORE if name == "coverage" else name)
            if name == "disagreement" and (values is None or not np.isfinite(values).any()):
                values = self.scores.get("entropy")
            if values is None:
                return []
            reviewed = set(self._reviewed[self.axis])
            if name == "coverage":
                return coverage_ranking(values.copy(), n, extent=self.foreground_extent(), exclude=reviewed,
                                        min_gap=min_gap)
            return rank_slices(values.copy(), n, exclude=reviewed, min_gap=min_gap)

    def foreground_extent(self) -> tuple[int, int] | None:
        """First and last slice (loop's axis) of the foreground: the last round's proposals and the
        reviewed slices that hold labels (None before any round)."""
        with self._lock:
            fg = self.scores.get("foreground")
            if fg is None:
                return None
            also = [s for s in self._reviewed[self.axis] if self.labels[self._sl(s)].any()]
            return foreground_extent(fg.copy(), also=also)

    def set_proposal(self, index: int, labels2d: np.ndarray) -> bool:
        """Write one slice's proposal (skipped, False, when the slice is reviewed)."""
        s = self._check(index, self.axis)
        with self._lock:
            if s in self._reviewed[self.axis]:
                return False
            self.proposals[self._sl(s)] = labels2d
            self._proposed.add(s)
        return True

    # -- rounds -----------------------------------------------------------------------------------
    def round_steps(self, encoder: Any, params: RoundParams = RoundParams(), *,
                    current: Callable[[], int] | None = None,
                    cancel: threading.Event | None = None) -> ProgressGen[RoundRecord]:
        """Train on the reviewed slices, re-predict the unreviewed ones; return the :class:`RoundRecord`.

        ``encoder``: a :class:`~napari_medsam.core.encoder.VolumeEncoder` of the image along the
        loop's axis; ``current()``: the slice in view (read again before every prediction batch).
        Progress ``info``: ``phase`` (``train``, ``predict``, ``cv``), the trainer's ``loss``, and
        in the predict phase ``slices``, the proposals just written. Cancelling (``cancel``) stops
        between steps; proposals written so far stay, no round is recorded.
        """
        from ..core.finetune import collect_training_data, fine_tune
        from ..core.infer import predict_slices

        check_strategy(params.strategy)
        if encoder.axis != self.axis or tuple(encoder.volume.spatial_shape) != tuple(self.labels.shape):
            raise MedSamError(f"the encoder slices a {tuple(encoder.volume.spatial_shape)} image along axis "
                              f"{encoder.axis}; the loop's labels are {tuple(self.labels.shape)} along axis "
                              f"{self.axis}: use the encoder of this image along the loop's axis")
        with self._lock:
            reviewed = sorted(self._reviewed[self.axis])
            snap = np.zeros_like(self.labels)
            for s in reviewed:
                snap[self._sl(s)] = self.labels[self._sl(s)]
            pending = dict(self._pending)
            n_new = self.new_since_round
        if not reviewed:
            raise InvalidImageError("no reviewed slices yet: correct or accept at least one slice, then run a round")
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {"round": len(self.rounds) + 1, "n_reviewed": len(reviewed), "n_new": n_new}
        metrics.update(self._proposal_metrics(pending, snap))

        prev = self.head
        init = prev if (params.warm_start and prev is not None and prev.meta.kind == params.train.head
                        and prev.meta.axis == self.axis) else None
        found = {int(v) for s in reviewed for v in np.unique(snap[self._sl(s)]) if v}
        ids = tuple(init.meta.class_ids) if init is not None else ()
        ids = ids + tuple(sorted(found - set(ids)))
        if not ids:
            raise InvalidImageError(f"the reviewed slices {reviewed[:8]} hold no labels: label at least one "
                                    "structure on one of them before training")
        yield Progress(0, 0, "embedding the reviewed slices", {"phase": "train"})
        data = yield from collect_training_data(encoder, snap, reviewed, class_ids=ids, cancel=cancel)
        names = tuple(self.class_names.get(c, f"class {c}") for c in ids)
        gen = fine_tune(data, params.train, loaded=encoder.loaded, class_names=names, init=init, cancel=cancel)
        head = yield from _relabel(gen, "training", "train")
        h = head.meta.history
        metrics.update({"train_seconds": h.get("seconds"), "steps": h.get("steps"), "final_loss": h.get("final_loss"),
                        "warm_start": init is not None, "head": head.meta.kind})

        t1 = time.perf_counter()
        n = self.n_slices
        cands = range(n) if params.candidates is None else sorted({int(s) for s in params.candidates if 0 <= s < n})
        todo = [s for s in cands if s not in set(reviewed)]
        new_scores = {name: np.full(n, np.nan) for name in ("entropy", "margin", "disagreement", "tta", "foreground")}
        with self._lock:
            self.scores = new_scores  # suggestions follow the new head as slices come in
        done = 0
        bs = max(1, int(params.batch_size))
        yield Progress(0, len(todo), "predicting", {"phase": "predict", "slices": ()})
        while todo:
            c = current() if current is not None else n // 2
            todo.sort(key=lambda i: (abs(i - int(c)), i))
            batch, todo = todo[:bs], todo[bs:]
            res = yield from _quiet(predict_slices(encoder, head, slices=batch, batch_size=bs, return_probs=True,
                                                   cancel=cancel))
            tta = {}
            if params.strategy == "tta":
                from ..core.uncertainty import tta_scores

                tta = tta_scores(encoder, head, batch, cancel=cancel)
            written = []
            for s in batch:
                lab = res.labels[self._sl(s)]
                probs = res.probs[(slice(None), *self._sl(s))] if res.probs is not None else None
                sc = slice_scores(probs) if probs is not None else {}
                with self._lock:
                    if s in self._reviewed[self.axis]:
                        continue  # reviewed while the round ran: never touched
                    if s in self._proposed:
                        new_scores["disagreement"][s] = disagreement_score(self.proposals[self._sl(s)], lab)
                    for k, v in sc.items():
                        new_scores[k][s] = v
                    if s in tta:
                        new_scores["tta"][s] = tta[s]
                    new_scores["foreground"][s] = float(np.count_nonzero(lab))
                    self.proposals[self._sl(s)] = lab
                    self._proposed.add(s)
                written.append(s)
            done += len(batch)
            yield Progress(done, done + len(todo), "predicting", {"phase": "predict", "slices": tuple(written)})
        metrics["predict_seconds"] = round(time.perf_counter() - t1, 3)
        metrics["n_predicted"] = done

        if params.cv_folds >= 2 and len(reviewed) >= 2:
            metrics["cv_dice"] = yield from self._cross_validate(encoder, data, snap, params, cancel)
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        record = RoundRecord(index=len(self.rounds) + 1, head=head, axis=self.axis, reviewed=tuple(reviewed),
                             metrics=metrics, timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with self._lock:
            self.rounds.append(record)
            for s in pending:
                self._pending.pop(s, None)
            self.new_since_round = max(0, self.new_since_round - n_new)
        self.round_finished.emit(record)
        self.changed.emit()
        return record

    def _proposal_metrics(self, pending: Mapping[int, np.ndarray], snap: np.ndarray) -> dict[str, Any]:
        """How the previous round's proposals compare with what the user kept on those slices."""
        if not pending:
            return {"proposal_dice": math.nan, "voxels_changed": 0, "n_compared": 0}
        order = sorted(pending)
        pred = np.stack([pending[s] for s in order])
        truth = np.stack([snap[self._sl(s)] for s in order])
        return {"proposal_dice": dice_score(pred, truth), "voxels_changed": int(np.count_nonzero(pred != truth)),
                "n_compared": len(order)}

    def _cross_validate(self, encoder: Any, data: Any, snap: np.ndarray, params: RoundParams,
                        cancel: threading.Event | None) -> ProgressGen[float]:
        """Dice on each fold of the reviewed slices of a fresh head trained on the others (pooled)."""
        from ..core.finetune import fine_tune
        from ..core.infer import predict_slices

        n = len(data.slices)
        k = min(int(params.cv_folds), n)
        tp = dataclasses.replace(params.train, max_steps=max(1, int(params.cv_max_steps)), epochs=None)
        preds, truths = [], []
        for f in range(k):
            held = [j for j in range(n) if j % k == f]
            keep = [j for j in range(n) if j % k != f]
            sub = dataclasses.replace(data, embeddings=data.embeddings[keep], images=data.images[keep],
                                      targets=data.targets[keep], slices=tuple(data.slices[j] for j in keep))
            head = yield from _relabel(fine_tune(sub, tp, loaded=encoder.loaded, cancel=cancel),
                                       f"cross-validation fold {f + 1} of {k}", "cv")
            slices = [data.slices[j] for j in held]
            res = yield from _quiet(predict_slices(encoder, head, slices=slices, cancel=cancel))
            preds.extend(res.labels[self._sl(s)] for s in slices)
            truths.extend(snap[self._sl(s)] for s in slices)
        return dice_score(np.stack(preds), np.stack(truths), data.class_ids)

    # -- persistence ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything but the arrays and the heads, as plain JSON-able values (for autosave)."""
        with self._lock:
            return {
                "axis": self.axis,
                "reviewed": {str(a): sorted(v) for a, v in self._reviewed.items()},
                "proposed": sorted(self._proposed),
                "class_names": {str(k): v for k, v in self.class_names.items()},
                "auto_every": self.auto_every,
                "new_since_round": self.new_since_round,
                "pending": sorted(self._pending),
                "rounds": [{"index": r.index, "axis": r.axis, "reviewed": list(r.reviewed),
                            "metrics": _jsonable(r.metrics), "timestamp": r.timestamp} for r in self.rounds],
            }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], labels: np.ndarray, proposals: np.ndarray | None = None,
                   heads: Sequence[Any] = (), pending: Mapping[int, np.ndarray] | None = None) -> ReviewLoop:
        """Rebuild a loop from :meth:`state`, the arrays and one head per recorded round (None allowed)."""
        loop = cls(labels, axis=int(state.get("axis", 0)), class_names={int(k): v for k, v in
                                                                       state.get("class_names", {}).items()},
                   auto_every=int(state.get("auto_every", 0)), proposals=proposals)
        for a, v in state.get("reviewed", {}).items():
            loop._reviewed[int(a)] = {int(s) for s in v}
        loop._proposed = {int(s) for s in state.get("proposed", ())} - loop._reviewed[loop.axis]
        loop.new_since_round = int(state.get("new_since_round", 0))
        loop._pending = {int(k): np.asarray(v) for k, v in (pending or {}).items()}
        rounds = state.get("rounds", [])
        heads = list(heads) + [None] * (len(rounds) - len(heads))
        loop.rounds = [RoundRecord(index=int(r["index"]), head=h, axis=int(r["axis"]), reviewed=tuple(r["reviewed"]),
                                   metrics=dict(r.get("metrics", {})), timestamp=r.get("timestamp", ""))
                       for r, h in zip(rounds, heads, strict=False)]
        return loop

    def metrics_table(self) -> str:
        """The rounds' metrics as a fixed-width text table ('' before the first round)."""
        if not self.rounds:
            return ""
        rows = [f"{'round':>5} {'reviewed':>8} {'proposal Dice':>13} {'changed':>8} {'CV Dice':>7}"]
        for r in self.rounds:
            m = r.metrics
            rows.append(f"{r.index:>5} {m.get('n_reviewed', 0):>8} {_fmt(m.get('proposal_dice')):>13} "
                        f"{m.get('voxels_changed', 0):>8} {_fmt(m.get('cv_dice')):>7}")
        return "\n".join(rows)

    def pending(self) -> dict[int, np.ndarray]:
        """The proposals of slices reviewed since the last round (for the next round's metrics)."""
        with self._lock:
            return {s: a.copy() for s, a in self._pending.items()}


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{float(v):.3f}"


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.floating, float)):
            v = None if not math.isfinite(float(v)) else float(v)
        elif isinstance(v, np.integer):
            v = int(v)
        out[k] = v
    return out


def _relabel(gen: ProgressGen[Any], message: str, phase: str) -> ProgressGen[Any]:
    """Re-yield a core generator's progress with this round's ``message`` and ``phase``."""
    try:
        while True:
            p = next(gen)
            yield Progress(p.step, p.total, message, {**p.info, "phase": phase})
    except StopIteration as stop:
        return stop.value
    finally:
        gen.close()


def _quiet(gen: ProgressGen[Any]) -> ProgressGen[Any]:
    """Drain a core generator without re-yielding (its progress is counted by the caller); closeable."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value
    finally:
        gen.close()
    yield  # pragma: no cover - makes this a generator
