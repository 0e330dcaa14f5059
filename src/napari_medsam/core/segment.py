"""Prompts to masks on 2D slices (3D propagation builds on these: :mod:`napari_medsam.core.propagation`).

Public functions take prompts in napari's data convention: points ``(row, col)`` and boxes
``(r0, c0, r1, c1)`` in pixels of the slice. :func:`_rc_to_xy` is the one place they become SAM's
``(x, y)`` / ``XYXY``. Masks come back on the slice's original pixel grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import PromptError
from .preprocess import SliceTransform


@dataclass(frozen=True)
class Prompt2D:
    """The prompts for one object on one slice.

    points: ``(N, 2)`` float ``(row, col)``; labels: ``(N,)`` int, 1 positive / 0 negative;
    box: ``(r0, c0, r1, c1)`` or None; mask_logits: ``(L, L)`` low-res logits from a previous
    prediction in the model frame (L = 4x the embedding grid) or None; known: the object's own
    ``(H, W)`` bool mask on this slice when a person drew or corrected it (a committed label), or
    None: the decoder ignores it, a propagation seeded here carries from it instead of from what the
    decoder makes of the other prompts.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box: tuple[float, float, float, float] | None = None
    mask_logits: np.ndarray | None = None
    known: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_box(cls, box: Sequence[float]) -> Prompt2D:
        return cls(box=tuple(float(v) for v in box))  # type: ignore[arg-type]

    @classmethod
    def from_points(cls, points: Sequence[Sequence[float]], labels: Sequence[int]) -> Prompt2D:
        return cls(points=np.asarray(points, np.float32).reshape(-1, 2), labels=np.asarray(labels, np.int64))

    @property
    def n_points(self) -> int:
        return int(np.asarray(self.points).reshape(-1, 2).shape[0])

    def is_empty(self) -> bool:
        return self.n_points == 0 and self.box is None and self.mask_logits is None


@dataclass(frozen=True)
class MaskResult:
    """One object's prediction: ``mask`` (H, W) bool on the original grid, the decoder's low-res
    ``logits`` (L, L) float32 in the model frame (feed back as ``Prompt2D.mask_logits``), ``iou`` its
    predicted IoU, and ``prob`` (H, W) float32 sigmoid probabilities when asked for."""

    mask: np.ndarray
    logits: np.ndarray
    iou: float
    prob: np.ndarray | None = None


def validate_prompt(p: Prompt2D, shape: tuple[int, int]) -> None:
    h, w = shape
    pts = np.asarray(p.points, np.float32).reshape(-1, 2)
    labels = np.asarray(p.labels).reshape(-1)
    if pts.shape[0] != labels.shape[0]:
        raise PromptError(f"{pts.shape[0]} points but {labels.shape[0]} labels")
    if pts.size and (not np.isfinite(pts).all() or (pts < -0.5).any() or (pts[:, 0] > h - 0.5).any()
                     or (pts[:, 1] > w - 0.5).any()):
        raise PromptError(f"points must lie inside the {h}x{w} slice (row, col); got {pts.tolist()}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise PromptError(f"point labels must be 1 (positive) or 0 (negative); got {labels.tolist()}")
    if p.box is not None:
        r0, c0, r1, c1 = p.box
        if not np.isfinite(np.asarray(p.box, np.float64)).all():
            raise PromptError(f"box (r0, c0, r1, c1) = {p.box} must be finite numbers")
        if not (r1 > r0 and c1 > c0):
            raise PromptError(f"box (r0, c0, r1, c1) = {p.box} must have r1 > r0 and c1 > c0")
        if r1 < 0 or c1 < 0 or r0 > h or c0 > w:
            raise PromptError(f"box {p.box} lies outside the {h}x{w} slice")
    if p.is_empty():
        raise PromptError("no prompt: give at least one point, a box or a previous mask")


def _clipped_box(box: Any, shape: tuple[int, int]) -> np.ndarray:
    """``(1, 4)`` box clipped to the ``(H, W)`` slice: a box partly outside means its inside part."""
    h, w = shape
    return np.clip(np.asarray(box, np.float32).reshape(1, 4), 0, np.array([h, w, h, w], np.float32))


def _rc_to_xy(tf: SliceTransform, points_rc: np.ndarray, box_rc: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """THE flip: (row, col) slice pixels -> SAM's (x, y) in the model's input frame; boxes -> XYXY."""
    pts = tf.rc_to_model(points_rc)[:, ::-1].copy()
    box = None
    if box_rc is not None:
        b = tf.box_to_model(box_rc)
        box = b[:, [1, 0, 3, 2]].copy()
    return pts, box


def decode(loaded: Any, embedding: Any, tf: SliceTransform, prompts: Sequence[Prompt2D], *,
           multimask: bool | None = None, return_prob: bool = False, fast: bool = True) -> list[MaskResult]:
    """Run the prompt encoder and mask decoder for several objects on one slice.

    Objects that share a prompt structure (same number of points, box or not, mask or not) go
    through the decoder in one batched call. ``multimask=None`` asks for three masks and keeps the
    best predicted IoU when an object has a single point and no box (SAM's ambiguity rule), for
    models whose weights were trained with points. ``fast=False`` runs the decoder's reference
    modules instead of its CPU inference fast paths (the same masks up to round-off; benchmarks).
    """
    import torch

    from .device import autocast

    spec = loaded.spec
    for p in prompts:
        validate_prompt(p, tf.original)
    groups: dict[tuple[int, bool, bool], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((p.n_points, p.box is not None, p.mask_logits is not None), []).append(i)
    results: list[MaskResult | None] = [None] * len(prompts)
    dev = loaded.device
    pe = loaded.model.prompt_encoder
    with torch.inference_mode(), autocast(dev, loaded.dtype):
        dense_pe = pe.get_dense_pe()
        for (n_pts, has_box, has_mask), idx in groups.items():
            pts_xy, labels, boxes_xy, masks = [], [], [], []
            for i in idx:
                p = prompts[i]
                pxy, bxy = _rc_to_xy(tf, np.asarray(p.points, np.float32).reshape(-1, 2),
                                     _clipped_box(p.box, tf.original) if has_box else None)
                pts_xy.append(pxy)
                labels.append(np.asarray(p.labels, np.int64).reshape(-1))
                if has_box:
                    boxes_xy.append(bxy[0])
                if has_mask:
                    masks.append(np.asarray(p.mask_logits, np.float32))
            points = None
            if n_pts:
                points = (torch.from_numpy(np.stack(pts_xy)).to(dev), torch.from_numpy(np.stack(labels)).to(dev))
            boxes = torch.from_numpy(np.stack(boxes_xy)).to(dev) if has_box else None
            mask_in = torch.from_numpy(np.stack(masks))[:, None].to(dev) if has_mask else None
            sparse, dense = pe(points, boxes, mask_in)
            mm = multimask
            if mm is None:
                mm = n_pts == 1 and not has_box and not has_mask and spec.multimask_single_point
            logits, iou = loaded.model.mask_decoder(embedding, dense_pe, sparse, dense, multimask_output=mm,
                                                    fast=fast)
            logits, iou = logits.float(), iou.float()
            best = iou.argmax(dim=1)
            ar = torch.arange(len(idx), device=logits.device)
            low = logits[ar, best]  # (B, L, L)
            iou_best = iou[ar, best]
            low_np = low.cpu().numpy()
            if spec.pipeline == "medsam":  # MedSAM's inference: bilinear(sigmoid(logits)) > 0.5
                prob_np = tf.logits_to_original(torch.sigmoid(low)).cpu().numpy()  # (B, H, W)
                masks_np = prob_np > 0.5
            else:
                full = tf.logits_to_original(low)  # (B, H, W)
                masks_np = full.cpu().numpy() > spec.mask_threshold
                prob_np = torch.sigmoid(full).cpu().numpy() if return_prob else None  # no exp overflow
            for j, i in enumerate(idx):
                prob = prob_np[j] if return_prob and prob_np is not None else None
                results[i] = MaskResult(mask=masks_np[j], logits=low_np[j], iou=float(iou_best[j]), prob=prob)
    return [r for r in results if r is not None]


def decode_all(loaded: Any, embedding: Any, tf: SliceTransform, prompt: Prompt2D, *,
               return_prob: bool = False) -> list[MaskResult]:
    """Every output of the mask decoder for one object: index 0 is the single-mask output (what
    :func:`decode` gives for a box), 1.. the multimask outputs, each with its predicted IoU.

    One decoder call. For callers that choose among the candidates by something other than the
    predicted IoU (propagation picks the one most like the previous slice's mask).
    """
    import torch

    from .device import autocast

    validate_prompt(prompt, tf.original)
    dev = loaded.device
    pe = loaded.model.prompt_encoder
    pxy, bxy = _rc_to_xy(tf, np.asarray(prompt.points, np.float32).reshape(-1, 2),
                         _clipped_box(prompt.box, tf.original) if prompt.box is not None else None)
    with torch.inference_mode(), autocast(dev, loaded.dtype):
        points = None
        if prompt.n_points:
            points = (torch.from_numpy(pxy[None]).to(dev),
                      torch.from_numpy(np.asarray(prompt.labels, np.int64).reshape(1, -1)).to(dev))
        boxes = torch.from_numpy(bxy).to(dev) if bxy is not None else None
        mask_in = None
        if prompt.mask_logits is not None:
            mask_in = torch.from_numpy(np.asarray(prompt.mask_logits, np.float32))[None, None].to(dev)
        sparse, dense = pe(points, boxes, mask_in)
        logits, iou = loaded.model.mask_decoder.predict_masks(embedding, pe.get_dense_pe(), sparse, dense)
        low = logits[0].float()  # (M, L, L)
        iou = iou[0].float().cpu().numpy()
        if loaded.spec.pipeline == "medsam":  # as in decode: bilinear(sigmoid(logits)) > 0.5
            prob = tf.logits_to_original(torch.sigmoid(low)).cpu().numpy()  # (M, H, W)
            masks = prob > 0.5
        else:
            full = tf.logits_to_original(low)  # (M, H, W)
            masks = full.cpu().numpy() > loaded.spec.mask_threshold
            prob = torch.sigmoid(full).cpu().numpy() if return_prob else None
    low_np = low.cpu().numpy()
    return [MaskResult(mask=masks[k], logits=low_np[k], iou=float(iou[k]),
                       prob=prob[k] if return_prob and prob is not None else None) for k in range(len(masks))]


def segment_slice(encoder: Any, index: int, prompts: Sequence[Prompt2D], **kw: Any) -> list[MaskResult]:
    """Masks for ``prompts`` on slice ``index`` of a :class:`~napari_medsam.core.encoder.VolumeEncoder`."""
    return decode(encoder.loaded, encoder.get(index), encoder.transform(), prompts, **kw)


def box_of(mask: np.ndarray, margin: float = 0.0) -> tuple[float, float, float, float] | None:
    """Bounding box ``(r0, c0, r1, c1)`` of a mask, grown by ``margin`` pixels and clipped; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (max(0.0, rows[0] - margin), max(0.0, cols[0] - margin),
            min(float(h), rows[-1] + 1 + margin), min(float(w), cols[-1] + 1 + margin))
