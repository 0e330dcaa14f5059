"""Prompt-free "segment everything" on one slice: SAM's automatic mask generator on our decoder.

The algorithm of segment-anything's ``SamAutomaticMaskGenerator`` (one crop layer): a regular grid
of single positive points, each decoded into three masks (SAM's ambiguity outputs) in batches
through our fast CPU decoder; masks kept when their predicted IoU and their stability score (IoU of
the mask thresholded at ``+offset`` and at ``-offset``) are high enough; duplicates removed by
box non-maximum suppression on the predicted IoU; optionally small islands and holes removed.
:func:`labels_from_masks` turns the objects into one label image (larger objects first, so that
smaller ones stay visible on top).

Only models trained with point prompts can do this: :func:`check_can_segment_everything` refuses
box-only models (LiteMedSAM, MedSAM) with the reason.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import Cancelled, PromptError
from .preprocess import SliceTransform
from .progress import Progress, ProgressGen


@dataclass(frozen=True)
class AutoParams:
    """segment-anything's ``SamAutomaticMaskGenerator`` options, with its defaults where they apply.

    ``points_per_side``: grid points along each side (SAM: 32; 16 here, a quarter of the decoder
    calls, for CPUs); ``points_per_batch``: points decoded together; ``pred_iou_thresh``,
    ``stability_score_thresh``, ``stability_score_offset``, ``box_nms_thresh``: as SAM's;
    ``min_mask_region_area``: islands and holes smaller than this many pixels are removed (0: off);
    ``max_objects``: the largest-IoU objects kept at most.
    """

    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    max_objects: int = 255


@dataclass(frozen=True)
class AutoMask:
    """One object: ``mask`` (H, W) bool on the slice grid, its predicted IoU and stability score."""

    mask: np.ndarray
    iou: float
    stability: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def check_can_segment_everything(spec: Any) -> None:
    """Raise :class:`PromptError` (with the reason) unless the model was trained with point prompts."""
    if "point" not in spec.prompts:
        raise PromptError(
            f"{spec.name} was trained with box prompts only, so it cannot segment everything from a grid of "
            "points; draw boxes, or load a point-prompted model (sam_vit_b, sam_vit_l, sam_vit_h, mobilesam)"
        )


def point_grid(n: int, shape: tuple[int, int]) -> np.ndarray:
    """``(n*n, 2)`` (row, col) points at the centres of an ``n x n`` grid over a slice (SAM's grid)."""
    if n < 1:
        raise PromptError(f"points per side must be at least 1, got {n}")
    offset = 1 / (2 * n)
    side = np.linspace(offset, 1 - offset, n)
    rows, cols = np.meshgrid(side * shape[0], side * shape[1], indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float32)


def stability_score(logits: Any, threshold: float, offset: float) -> Any:
    """IoU of ``logits > threshold + offset`` within ``logits > threshold - offset`` per mask (torch;
    segment-anything's ``calculate_stability_score``)."""
    inter = (logits > threshold + offset).flatten(-2).sum(-1)
    union = (logits > threshold - offset).flatten(-2).sum(-1)
    return inter.float() / union.clamp(min=1).float()


def boxes_of(masks: Any) -> Any:
    """``(N, 4)`` XYXY boxes (inclusive pixel indices, torch) of ``(N, H, W)`` bool masks; 0s if empty."""
    import torch

    n, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (N, H), (N, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values
    x0 = torch.where(cols, ar_w, w).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values
    box = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where((y1 >= 0)[:, None], box, torch.zeros_like(box))


def nms(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """Indices kept by greedy non-maximum suppression, highest score first (``torchvision.ops.nms``)."""
    import torch

    b = boxes.float()
    order = scores.argsort(descending=True)
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    keep: list[int] = []
    suppressed = torch.zeros(len(b), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx0 = torch.maximum(b[i, 0], b[:, 0])
        yy0 = torch.maximum(b[i, 1], b[:, 1])
        xx1 = torch.minimum(b[i, 2], b[:, 2])
        yy1 = torch.minimum(b[i, 3], b[:, 3])
        inter = (xx1 - xx0).clamp(min=0) * (yy1 - yy0).clamp(min=0)
        iou = inter / (area[i] + area - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.as_tensor(keep, dtype=torch.long)


def remove_small_regions(mask: np.ndarray, area: int) -> np.ndarray:
    """``mask`` with holes smaller than ``area`` pixels filled, then islands smaller than ``area``
    removed (the largest kept if all are small); 8-connected, as segment-anything's post-processing."""
    from scipy import ndimage as ndi

    eight = np.ones((3, 3), dtype=bool)
    out = np.asarray(mask, dtype=bool).copy()
    holes, n = ndi.label(~out, structure=eight)
    if n:
        sizes = np.bincount(holes.ravel())[1:]
        out |= np.isin(holes, np.flatnonzero(sizes < area) + 1)
    islands, n = ndi.label(out, structure=eight)
    if n:
        sizes = np.bincount(islands.ravel())[1:]
        big = np.flatnonzero(sizes >= area) + 1
        out = np.isin(islands, big if big.size else [int(np.argmax(sizes)) + 1])
    return out


def segment_everything(loaded: Any, embedding: Any, tf: SliceTransform, *, params: AutoParams = AutoParams(),
                       cancel: threading.Event | None = None, fast: bool = True) -> ProgressGen[list[AutoMask]]:
    """Every object the model finds on one slice, from a grid of points; yields :class:`Progress`.

    ``embedding``: the slice's ``(1, C, h, w)`` embedding; ``tf``: its :class:`SliceTransform`.
    Returns the objects sorted by predicted IoU (best first). Raises :class:`PromptError` for
    box-only models and :class:`Cancelled` when ``cancel`` is set between batches.
    """
    import torch

    from .device import autocast
    from .segment import _rc_to_xy

    spec = loaded.spec
    check_can_segment_everything(spec)
    grid = point_grid(params.points_per_side, tf.original)
    pts_xy, _ = _rc_to_xy(tf, grid, None)
    dev = loaded.device
    pe, dec = loaded.model.prompt_encoder, loaded.model.mask_decoder
    n_batches = -(-len(grid) // params.points_per_batch)
    kept_masks: list[Any] = []
    kept_iou: list[Any] = []
    kept_stab: list[Any] = []
    with torch.inference_mode():
        emb = embedding.to(dev)
        for b in range(n_batches):
            if cancel is not None and cancel.is_set():
                raise Cancelled("segment everything stopped; nothing was written")
            sl = slice(b * params.points_per_batch, (b + 1) * params.points_per_batch)
            coords = torch.from_numpy(pts_xy[sl])[:, None, :].to(dev)  # (B, 1, 2)
            labels = torch.ones(coords.shape[:2], dtype=torch.long, device=dev)
            with autocast(dev, loaded.dtype):
                sparse, dense = pe((coords, labels), None, None)
                logits, iou = dec(emb, pe.get_dense_pe(), sparse, dense, multimask_output=True, fast=fast)
            logits, iou = logits.float().flatten(0, 1), iou.float().flatten(0, 1)  # (3B, L, L), (3B,)
            good = iou > params.pred_iou_thresh
            for chunk in torch.nonzero(good).flatten().split(16):  # full-resolution logits, 16 at a time
                full = tf.logits_to_original(logits[chunk])  # (k, H, W)
                stab = stability_score(full, spec.mask_threshold, params.stability_score_offset)
                ok = stab >= params.stability_score_thresh
                kept_masks.append((full[ok] > spec.mask_threshold).cpu())
                kept_iou.append(iou[chunk][ok].cpu())
                kept_stab.append(stab[ok].cpu())
            yield Progress(b + 1, n_batches + 1, "segmenting everything", {"objects": sum(len(m) for m in kept_iou)})
    if not kept_masks or sum(len(m) for m in kept_masks) == 0:
        yield Progress(n_batches + 1, n_batches + 1, "segmenting everything", {"objects": 0})
        return []
    masks = torch.cat(kept_masks)
    ious, stabs = torch.cat(kept_iou), torch.cat(kept_stab)
    nonempty = masks.flatten(1).any(dim=1)
    masks, ious, stabs = masks[nonempty], ious[nonempty], stabs[nonempty]
    keep = nms(boxes_of(masks), ious, params.box_nms_thresh)
    out = []
    for i in keep.tolist():
        m = masks[i].numpy()
        if params.min_mask_region_area > 0:
            m = remove_small_regions(m, params.min_mask_region_area)
        if m.any():
            out.append(AutoMask(mask=m, iou=float(ious[i]), stability=float(stabs[i])))
    if params.min_mask_region_area > 0 and out:  # SAM re-runs NMS after the clean-up
        t = torch.from_numpy(np.stack([o.mask for o in out]))
        keep2 = nms(boxes_of(t), torch.tensor([o.iou for o in out]), params.box_nms_thresh).tolist()
        out = [out[i] for i in keep2]
    out.sort(key=lambda o: -o.iou)
    out = out[: params.max_objects]
    yield Progress(n_batches + 1, n_batches + 1, "segmenting everything", {"objects": len(out)})
    return out


def labels_from_masks(masks: list[AutoMask], shape: tuple[int, int]) -> np.ndarray:
    """One label image: object ``k`` (1-based, in the order given) painted largest first, so smaller
    objects stay on top of the larger ones they overlap. uint8 up to 255 objects, else uint16."""
    dtype = np.uint8 if len(masks) < 256 else np.uint16
    out = np.zeros(shape, dtype=dtype)
    for k in sorted(range(len(masks)), key=lambda i: -masks[i].area):
        out[masks[k].mask] = k + 1
    return out


def segment_everything_slice(encoder: Any, index: int, *, params: AutoParams = AutoParams(),
                             cancel: threading.Event | None = None) -> ProgressGen[np.ndarray]:
    """Label image of everything on slice ``index`` of a :class:`~napari_medsam.core.encoder.VolumeEncoder`.

    The entry point for the Annotate dock and the CLI: embeds the slice (through the cache) and
    returns an ``(H, W)`` label image, 0 for background.
    """
    check_can_segment_everything(encoder.loaded.spec)
    tf = encoder.transform()
    masks = yield from segment_everything(encoder.loaded, encoder.get(index), tf, params=params, cancel=cancel)
    return labels_from_masks(masks, tf.original)
