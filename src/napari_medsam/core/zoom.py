"""Zoom: prompts on a small object decoded on an embedding of the region around it.

A model sees a slice at its input size (LiteMedSAM 256 px, SAM 1024 px) and its masks are decoded
from an image embedding of 64 x 64 cells: a 13 x 22 px lateral ventricle on a 197 x 189 px MNI
coronal slice covers a few 3 x 3 px cells, and its box mask had a 2D Dice of 0.20. Encoding
instead the square around the box, ``context`` times its longer side, gives the object the whole
input: 0.73 on the same box (MNI152, the 12 structure x plane seeds of
``benchmarks/bench_propagation.py --seeds``; see "Fifth pass: zoom" in docs/benchmarks.md). The price is one
encoder call per window, not cached (a window follows a box; the slice's own embedding stays what
the cache and the prefetcher hold).

Masks and probabilities come back on the slice's own grid (zero outside the window); a
:class:`~napari_medsam.core.segment.MaskResult`'s ``logits`` stay in the *window's* model frame, so
they are only fed back as a mask prompt on the same window.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from .segment import MaskResult, Prompt2D, decode, decode_all

__all__ = ["DEFAULT_CONTEXT", "MIN_GAIN", "MIN_SIDE", "box_zoom_window", "decode_zoomed", "prompt_bounds",
           "zoom_gain", "zoom_window"]

#: The window's side over the box's longer side: 2 (half the box's side of context each side) gave
#: a better seed mask than 3 on 5 of the 9 MNI seeds that zoom, worse on 2, and 3 gave no window
#: on the other 2 (``benchmarks/bench_propagation.py --seeds``; docs/benchmarks.md).
DEFAULT_CONTEXT = 2.0
#: The least window side in slice pixels (a tiny box still gets some context).
MIN_SIDE = 32
#: Zoom only where it magnifies at least this much (else the slice's own embedding is as good).
MIN_GAIN = 1.5

Window = tuple[int, int, int, int]


def zoom_window(box: tuple[float, float, float, float] | None, shape: tuple[int, int], *,
                context: float = DEFAULT_CONTEXT, min_side: int = MIN_SIDE,
                min_gain: float = MIN_GAIN) -> Window | None:
    """The square window ``(r0, c0, r1, c1)`` (slice pixels, half-open) around ``box``: ``context``
    times its longer side (at least ``min_side``), centred on it and moved inside the slice where
    the slice is large enough (clipped where not). None when there is no box or the window would
    not magnify the object ``min_gain`` times over the whole slice."""
    if box is None:
        return None
    h, w = int(shape[0]), int(shape[1])
    r0, c0, r1, c1 = (float(v) for v in box)
    side = max(r1 - r0, c1 - c0, 1.0) * float(context)
    side = int(np.ceil(max(side, float(min_side))))
    if side * float(min_gain) > max(h, w):
        return None

    def place(lo: float, hi: float, n: int) -> tuple[int, int]:
        if side >= n:
            return 0, n
        start = int(round((lo + hi) / 2 - side / 2))
        start = min(max(start, 0), n - side)
        return start, start + side

    wr0, wr1 = place(r0, r1, h)
    wc0, wc1 = place(c0, c1, w)
    return wr0, wc0, wr1, wc1


def prompt_bounds(p: Prompt2D) -> tuple[float, float, float, float] | None:
    """The box around ``p``'s box and positive points (what a window must hold); None if neither."""
    pts = np.asarray(p.points, np.float32).reshape(-1, 2)[np.asarray(p.labels).reshape(-1) == 1]
    parts = [np.array([[p.box[0], p.box[1]], [p.box[2], p.box[3]]], np.float32)] if p.box is not None else []
    if pts.size:
        parts.append(np.concatenate([pts, pts + 1]))
    if not parts:
        return None
    allp = np.concatenate(parts)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def box_zoom_window(prompt: Any, shape: tuple[int, int], context: float | None) -> tuple[int, int, int, int] | None:
    """The window (slice pixels ``(r0, c0, r1, c1)``, half-open) a box prompt on a slice of
    ``shape`` is decoded on when zoom is on (``context``: the window's side over the box's; None:
    off), or None: no box (points alone, a click on a large structure, are never zoomed), a mask
    prompt (its logits are in the slice's model frame), or a box too large for a window to magnify
    it (:func:`zoom_window`). Cheap: no encoder call."""
    if context is None or prompt is None or getattr(prompt, "box", None) is None \
            or getattr(prompt, "mask_logits", None) is not None:
        return None
    return zoom_window(prompt_bounds(prompt), (int(shape[0]), int(shape[1])), context=float(context))


def zoom_gain(window: tuple[int, int, int, int], shape: tuple[int, int]) -> float:
    """How many times a window magnifies over the whole slice (the model input is the longer side)."""
    r0, c0, r1, c1 = window
    return max(int(shape[0]), int(shape[1])) / max(r1 - r0, c1 - c0, 1)


def _shift(p: Prompt2D, window: Window) -> Prompt2D:
    """``p`` in the window's pixels; points outside the window are left out (negative points far
    from the object: a window always holds the box and the positive points). A mask prompt must
    already be in the window's frame."""
    r0, c0, r1, c1 = window
    pts = np.asarray(p.points, np.float32).reshape(-1, 2)
    labels = np.asarray(p.labels, np.int64).reshape(-1)
    inside = (pts[:, 0] >= r0) & (pts[:, 0] < r1) & (pts[:, 1] >= c0) & (pts[:, 1] < c1)
    pts = pts[inside] - np.array([r0, c0], np.float32)
    box = None if p.box is None else (p.box[0] - r0, p.box[1] - c0, p.box[2] - r0, p.box[3] - c0)
    return replace(p, points=pts, labels=labels[inside], box=box)


def _paste(res: MaskResult, window: Window, shape: tuple[int, int]) -> MaskResult:
    r0, c0, r1, c1 = window
    mask = np.zeros(shape, bool)
    mask[r0:r1, c0:c1] = res.mask
    prob = None
    if res.prob is not None:
        prob = np.zeros(shape, np.float32)
        prob[r0:r1, c0:c1] = res.prob
    return MaskResult(mask=mask, logits=res.logits, iou=res.iou, prob=prob)


def decode_zoomed(encoder: Any, index: int, prompt: Prompt2D, window: Window, *, all_outputs: bool = False,
                  return_prob: bool = False) -> tuple[list[MaskResult], Any]:
    """Decode ``prompt`` (slice pixels) on the embedding of ``window`` of slice ``index`` of a
    :class:`~napari_medsam.core.encoder.VolumeEncoder`: ``[mask]`` (what
    :func:`~napari_medsam.core.segment.decode` gives), or with ``all_outputs`` every decoder output
    (:func:`~napari_medsam.core.segment.decode_all`), on the slice's grid; and the window's
    embedding (for features pooled in a mask: pair it with the results' ``logits``)."""
    emb, tf = encoder.embed_window(index, window)
    local = _shift(prompt, window)
    if all_outputs:
        out = decode_all(encoder.loaded, emb, tf, local, return_prob=return_prob)
    else:
        out = decode(encoder.loaded, emb, tf, [local], return_prob=return_prob)
    shape = encoder.slice_shape
    return [_paste(r, window, shape) for r in out], emb
