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
Which score is the default (:data:`DEFAULT_SCORE`) was measured: ``benchmarks/bench_active.py``,
figures in docs/benchmarks.md.
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
#: the score the review loop ranks by unless told otherwise (see docs/benchmarks.md, active learning)
DEFAULT_SCORE = "entropy"
#: a pixel is uncertain foreground when ``1 - p_background`` exceeds this
FOREGROUND = 0.25
#: the shifts (rows, columns of embedding cells) of the test-time augmentation
TTA_SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def check_score(name: str) -> str:
    """``name`` if it is a known score, else a :class:`MedSamError` naming them."""
    if name not in SCORES:
        raise MedSamError(f"unknown uncertainty score {name!r}; choose one of: {', '.join(SCORES)}")
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
    if isinstance(scores, Mapping):
        items = [(int(k), float(v)) for k, v in scores.items()]
    else:
        items = [(i, float(v)) for i, v in enumerate(np.asarray(scores, dtype=np.float64).ravel())]
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


__all__ = ["DEFAULT_SCORE", "FOREGROUND", "SCORES", "TTA_SHIFTS", "check_score", "disagreement_score",
           "rank_slices", "slice_scores", "tta_scores"]
