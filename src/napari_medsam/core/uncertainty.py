"""Which slice to review next: per-slice uncertainty of a prompt-free head, and spread-out picks.

Scores (higher: more worth a look), each a number per slice:

``entropy``
    The class-probability entropy (normalised to 0..1 by ``log K``) summed over the slice's
    *uncertain foreground* (pixels whose foreground probability ``1 - p_background`` exceeds
    :data:`FOREGROUND`), divided by the slice's pixel count: about the share of the slice the
    head is unsure of, so large structures with a ragged edge score higher than a clean one.
``margin``
    The same sum of ``1 - (p_first - p_second)`` (the gap between the two most probable classes).
``disagreement``
    The share of the slice's pixels whose label changed between the last two rounds' proposals.
``tta``
    Test-time augmentation: the head is run again on the embedding (and image) shifted by one cell
    in each of four directions, the output shifted back; the score is the mean per-pixel variance of
    the class probabilities over the passes (inside the image). Embeddings are cached, so the
    extra passes cost head time only. (Flips are not used: the embedding of a flipped image is not
    the flipped embedding, see :class:`~napari_medsam.core.finetune.TrainParams`.)

:func:`rank_slices` picks the best-scoring slices, at most one in any ``min_gap`` neighbourhood,
so a batch of suggestions is not three neighbours that look alike.

Strategies (:data:`STRATEGIES`: how suggestions are ranked): one of the scores alone, or
``coverage`` (:func:`coverage_ranking`): the longest run of unreviewed slices between reviewed
ones and the ends of the foreground the head predicts (:func:`foreground_extent`) is split at its
middle first; between runs of equal length the one nearer slice 0 (:data:`COVERAGE_TIE`; with
``tie="score"`` the one whose middle is more uncertain, :data:`DEFAULT_SCORE`, the default until
measured worse); with ``window > 0`` the most uncertain slice inside the middle part of a run; never
a neighbour of a reviewed slice while anything else is left. Which strategy is the default
(:data:`DEFAULT_STRATEGY`) was measured: ``benchmarks/bench_active.py``, figures in
docs/benchmarks.md (no score alone beat evenly spaced slices there).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import Cancelled, MedSamError

#: the per-slice scores this module computes
SCORES = ("entropy", "margin", "disagreement", "tta")
#: the score computed every round, and the one ``coverage`` picks by inside a gap
DEFAULT_SCORE = "entropy"
#: how suggestions can be ranked: by coverage of the volume (ties by uncertainty) or by one score
STRATEGIES = ("coverage", *SCORES)
#: the strategy the review loop ranks by unless told otherwise (see docs/benchmarks.md, active learning)
DEFAULT_STRATEGY = "coverage"
#: ``coverage`` picks the most uncertain slice inside the middle part of a gap, this share of its
#: length (0: the middle slice; 1/3 measured no better, see docs/benchmarks.md)
COVERAGE_WINDOW = 0.0
#: how ``coverage`` orders runs of equal length: ``score`` (the run whose pick is the most
#: uncertain first), ``spread`` (the run whose pick is farthest from the reviewed slices, summed
#: over them, first) or ``lower`` (the run nearer the start of the axis first, as evenly spaced
#: slices do); ties left over go to the lower slice. ``lower`` is the default: the entropy
#: tie-break kept coverage off the ends of the volume and below evenly spaced slices on GM/WM
#: (docs/benchmarks.md, active learning, the tie-break)
COVERAGE_TIES = ("score", "spread", "lower")
COVERAGE_TIE = "lower"
#: a slice belongs to the foreground extent when its predicted foreground is at least this share
#: of the largest slice's (stray specks on empty slices do not stretch the extent)
EXTENT_SHARE = 0.02
#: a pixel is uncertain foreground when ``1 - p_background`` exceeds this
FOREGROUND = 0.25
#: the shifts (rows, columns of embedding cells) of the test-time augmentation
TTA_SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def check_score(name: str) -> str:
    """``name`` if it is a known score, else a :class:`MedSamError` naming them."""
    if name not in SCORES:
        raise MedSamError(f"unknown uncertainty score {name!r}; choose one of: {', '.join(SCORES)}")
    return name


def check_strategy(name: str) -> str:
    """``name`` if it is a known ranking strategy, else a :class:`MedSamError` naming them."""
    if name not in STRATEGIES:
        raise MedSamError(f"unknown suggestion strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return name


def slice_scores(probs: np.ndarray) -> dict[str, float]:
    """``entropy`` and ``margin`` of one slice from its ``(K, H, W)`` class probabilities (channel 0 background)."""
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 3 or p.shape[0] < 2:
        raise MedSamError(f"expected (K, H, W) class probabilities with K >= 2, got shape {p.shape}")
    area = float(p.shape[1] * p.shape[2]) or 1.0
    region = (1.0 - p[0]) > FOREGROUND
    if not region.any():
        return {"entropy": 0.0, "margin": 0.0}
    q = np.clip(p[:, region], 1e-7, 1.0)  # (K, n)
    ent = -(q * np.log(q)).sum(0) / math.log(p.shape[0])
    top2 = np.sort(q, axis=0)[-2:]
    margin = 1.0 - (top2[1] - top2[0])
    return {"entropy": float(ent.sum() / area), "margin": float(margin.sum() / area)}


def disagreement_score(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the pixels of one slice whose label differs between two proposals ``a`` and ``b``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise MedSamError(f"proposals of shapes {a.shape} and {b.shape} cannot be compared")
    return float(np.count_nonzero(a != b)) / float(a.size or 1)


def tta_scores(encoder: Any, head: Any, slices: Sequence[int], *, shifts: Sequence[tuple[int, int]] = TTA_SHIFTS,
               cancel: threading.Event | None = None) -> dict[int, float]:
    """Test-time-augmentation variance per slice (see the module docstring); embeds what is not cached.

    ``encoder``: the :class:`~napari_medsam.core.encoder.VolumeEncoder` the head reads;
    ``head``: a :class:`~napari_medsam.core.finetune.TrainedHead`. Computed in the model's
    low-resolution frame (the head's output), inside the image's own area.
    """
    import torch

    module = head.module
    tf = encoder.transform()
    out: dict[int, float] = {}
    for s in slices:
        if cancel is not None and cancel.is_set():
            raise Cancelled("scoring stopped")
        s = int(s)
        emb = encoder.get(s).float()  # (1, C, h, w)
        img = None
        if getattr(module, "uses_image", False):
            img = torch.from_numpy(encoder.model_input(s)[None]).to(emb.device)  # (1, 3, S, S)
        h = emb.shape[-1]
        passes = []
        with torch.inference_mode():
            for dy, dx in ((0, 0), *shifts):
                e = torch.roll(emb, (dy, dx), dims=(-2, -1))
                i = None
                if img is not None:
                    fi = img.shape[-1] // h
                    i = torch.roll(img, (dy * fi, dx * fi), dims=(-2, -1))
                logits = module(e, i)  # (1, K, L, L)
                fl = logits.shape[-1] // h
                logits = torch.roll(logits, (-dy * fl, -dx * fl), dims=(-2, -1))
                passes.append(torch.softmax(logits.float(), dim=1)[0])
        stack = torch.stack(passes)  # (P, K, L, L)
        side = stack.shape[-1]
        vr = max(1, math.ceil(tf.resized[0] * side / tf.input_size))
        vc = max(1, math.ceil(tf.resized[1] * side / tf.input_size))
        var = stack[..., :vr, :vc].var(dim=0, unbiased=False).sum(0)  # (vr, vc)
        out[s] = float(var.mean())
    return out


def rank_slices(scores: Mapping[int, float] | Sequence[float] | np.ndarray, n: int, *, exclude: Iterable[int] = (),
                min_gap: int = 2) -> list[tuple[int, float]]:
    """The ``n`` best-scoring slices, highest first, as ``(slice, score)``, spread out.

    ``scores``: ``{slice: score}`` or one score per slice (NaN: not scored, never picked);
    ``exclude``: slices never picked (the reviewed ones); ``min_gap``: picks are at least this
    many slices apart (2: no two neighbours; 1: any). Ties go to the lower slice index.
    """
    items = _items(scores)
    skip = {int(s) for s in exclude}
    gap = max(1, int(min_gap))
    cands = sorted(((s, v) for s, v in items if s not in skip and math.isfinite(v)), key=lambda t: (-t[1], t[0]))
    picked: list[tuple[int, float]] = []
    for s, v in cands:
        if len(picked) >= n:
            break
        if all(abs(s - p) >= gap for p, _ in picked):
            picked.append((s, v))
    return picked


def foreground_extent(foreground: Mapping[int, float] | Sequence[float] | np.ndarray, *, also: Iterable[int] = (),
                      share: float = EXTENT_SHARE) -> tuple[int, int] | None:
    """First and last slice whose predicted foreground reaches ``share`` of the largest one's.

    ``foreground``: ``{slice: foreground pixels}`` or one value per slice (NaN: not predicted);
    ``also``: slices inside the extent whatever was predicted (the reviewed ones holding labels).
    None when nothing is foreground.
    """
    items = _items(foreground)
    top = max((v for _, v in items if math.isfinite(v)), default=0.0)
    inside = [s for s, v in items if math.isfinite(v) and v > 0 and v >= share * top]
    inside += [int(s) for s in also]
    return (min(inside), max(inside)) if inside else None


def coverage_ranking(scores: Mapping[int, float] | Sequence[float] | np.ndarray, n: int, *,
                     extent: tuple[int, int] | None = None, exclude: Iterable[int] = (), min_gap: int = 2,
                     window: float = COVERAGE_WINDOW,
                     mass: Mapping[int, float] | Sequence[float] | np.ndarray | None = None,
                     tie: str = COVERAGE_TIE) -> list[tuple[int, float]]:
    """``n`` slices that cover the volume, in the order they split it, as ``(slice, score)``.

    ``scores``: ``{slice: score}`` or one per slice; the finite ones are the candidates (NaN: not
    predicted); ``extent``: ``(first, last)`` slice of the foreground (None: the candidates' and
    the excluded slices' span); candidates outside it are picked only when none inside is left;
    ``exclude``: the reviewed slices. Gaps are counted in candidate slices (a pool of every 4th
    slice is split like a volume of every slice), between reviewed slices and one step beyond
    each end of the extent. Each pick: the longest gap (ties, :data:`COVERAGE_TIES`: ``score``, the
    one whose pick scores highest; ``spread``, the one whose pick has the largest summed distance to
    the reviewed slices inside the extent, counted in candidates; ``lower``, the one nearer slice 0),
    inside it the highest-scoring candidate within the middle ``window`` of its length (0: the
    middle one), ties to the middle, then to the lower slice; picks and reviewed slices are at least ``min_gap`` apart
    unless no other candidate is left. ``mass``: what each slice counts for when gaps are measured
    (e.g. its foreground pixels: a gap of large slices is split before one of small slices;
    None: every slice counts one; a missing or non-finite mass counts as the mean of the others).
    """
    if tie not in COVERAGE_TIES:
        raise MedSamError(f"unknown coverage tie-break {tie!r}; choose one of: {', '.join(COVERAGE_TIES)}")
    skip = {int(s) for s in exclude}
    cands = {s: v for s, v in _items(scores) if s not in skip and math.isfinite(v)}
    if extent is not None:
        lo, hi = int(extent[0]), int(extent[1])
        if not any(lo <= s <= hi for s in cands):
            lo, hi = min(cands, default=0), max(cands, default=-1)
    else:
        span = [*cands, *skip]
        lo, hi = (min(span), max(span)) if span else (0, -1)
    inside = {s: v for s, v in cands.items() if lo <= s <= hi}
    outside = {s: v for s, v in cands.items() if s not in inside}
    gap = max(1, int(min_gap))
    weight = None
    if mass is not None:
        given = {s: v for s, v in _items(mass) if math.isfinite(v) and v >= 0}
        mean = float(np.mean(list(given.values()))) if given else 1.0
        weight = {s: given.get(s, mean) for s in [*cands, *skip]}
        if sum(weight.values()) <= 0:
            weight = None
    taken = set(skip)
    picked: list[tuple[int, float]] = []
    for pool in (inside, outside):
        while pool and len(picked) < n:
            anchors = {s for s in taken if lo <= s <= hi}
            best = _best_in_gaps(pool, anchors, taken, gap, window, weight, tie)
            if best is None:
                best = _best_in_gaps(pool, anchors, taken, 1, window, weight, tie)
            s = best if best is not None else min(pool)
            picked.append((s, pool.pop(s)))
            taken.add(s)
    return picked


def _best_in_gaps(pool: dict[int, float], anchors: set[int], taken: set[int], gap: int, window: float,
                  weight: Mapping[int, float] | None = None, tie: str = COVERAGE_TIE) -> int | None:
    """The pick of :func:`coverage_ranking` among ``pool`` split by ``anchors`` (None: none allowed)."""
    order = sorted({*pool, *anchors})
    m = [1.0 if weight is None else float(weight[s]) for s in order]
    step = float(np.mean(m)) if m else 1.0
    # each slice's place on a line where it takes its mass: slices i and ends -1, len(order)
    cum = np.concatenate([[0.0], np.cumsum(m)])
    x = {s: float(cum[i] + m[i] / 2) for i, s in enumerate(order)}
    ends = (-step / 2, float(cum[-1]) + step / 2)
    bounds = [ends[0], *sorted(x[a] for a in anchors), ends[1]]
    best_key, best = None, None
    for a, b in zip(bounds, bounds[1:], strict=False):
        ok = [s for s in order if a < x[s] < b and s in pool and all(abs(s - t) >= gap for t in taken)]
        if not ok:
            continue
        mid = (a + b) / 2
        half = window * (b - a) / 2
        win = [s for s in ok if abs(x[s] - mid) <= half + 1e-9] or [min(ok, key=lambda s: (abs(x[s] - mid), s))]
        s = max(win, key=lambda s: (pool[s], -abs(x[s] - mid), -s))
        if tie == "score":
            second = pool[s]
        elif tie == "spread":
            second = round(sum(abs(x[s] - x[t]) for t in anchors), 9)
        else:
            second = 0.0
        key = (round(b - a, 9), second, -s)
        if best_key is None or key > best_key:
            best_key, best = key, s
    return best


def _items(values: Mapping[int, float] | Sequence[float] | np.ndarray) -> list[tuple[int, float]]:
    if isinstance(values, Mapping):
        return [(int(k), float(v)) for k, v in values.items()]
    return [(i, float(v)) for i, v in enumerate(np.asarray(values, dtype=np.float64).ravel())]


__all__ = ["COVERAGE_TIE", "COVERAGE_TIES", "COVERAGE_WINDOW", "DEFAULT_SCORE", "DEFAULT_STRATEGY", "EXTENT_SHARE", "FOREGROUND", "SCORES",
           "STRATEGIES", "TTA_SHIFTS", "check_score", "check_strategy", "coverage_ranking", "disagreement_score",
           "foreground_extent", "rank_slices", "slice_scores", "tta_scores"]
