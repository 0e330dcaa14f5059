"""Segment everything: the pieces against segment-anything's own (grid, stability, boxes, NMS), then
the whole on a real MNI slice with the tiny ViT (random weights: permissive thresholds)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_medsam.core.automatic import (
    AutoParams,
    boxes_of,
    check_can_segment_everything,
    labels_from_masks,
    nms,
    point_grid,
    remove_small_regions,
    segment_everything,
    segment_everything_slice,
    stability_score,
)
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import Cancelled, PromptError
from napari_medsam.core.progress import drain
from napari_medsam.core.registry import get_spec
from tests._helpers import drain_steps

amg = pytest.importorskip("segment_anything.utils.amg")


@pytest.mark.parametrize("name", ["litemedsam", "medsam_vit_b"])
def test_box_only_models_are_refused_with_the_reason(name):
    with pytest.raises(PromptError, match="box prompts only"):
        check_can_segment_everything(get_spec(name))
    for ok in ("sam_vit_b", "mobilesam", "test_tiny_vit"):
        check_can_segment_everything(get_spec(ok))


def test_point_grid_is_sams():
    h, w = 197, 233
    ref = amg.build_point_grid(8) * np.array([[w, h]])  # (x, y)
    np.testing.assert_allclose(point_grid(8, (h, w)), ref[:, ::-1], rtol=1e-5)


def test_stability_boxes_and_nms_match_segment_anything():
    from torchvision.ops import nms as tv_nms

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, 50, generator=g).cumsum(-1)  # smooth-ish
    torch.testing.assert_close(stability_score(logits, 0.0, 1.0), amg.calculate_stability_score(logits, 0.0, 1.0))
    masks = logits > 0
    masks[2] = False  # an empty mask: box of zeros, as segment-anything's
    torch.testing.assert_close(boxes_of(masks), amg.batched_mask_to_box(masks))
    xy = torch.rand(60, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + torch.rand(60, 2, generator=g) * 40 + 1], dim=1)
    scores = torch.rand(60, generator=g)
    for thr in (0.3, 0.7):
        assert nms(boxes, scores, thr).tolist() == tv_nms(boxes, scores, thr).tolist()


def test_small_holes_and_islands_are_removed():
    m = np.zeros((30, 30), bool)
    m[5:20, 5:20] = True
    m[10, 10] = False          # a 1-pixel hole
    m[25:27, 25:27] = True     # a 4-pixel island
    out = remove_small_regions(m, 10)
    assert out[10, 10] and not out[25:27, 25:27].any() and out[5:20, 5:20].all()
    only_small = np.zeros((10, 10), bool)
    only_small[1, 1] = only_small[5:7, 5:7] = True
    kept = remove_small_regions(only_small, 10)  # every island is small: the largest stays
    assert kept[5:7, 5:7].all() and not kept[1, 1]


@pytest.fixture(scope="module")
def tiny_vit_mni(mni):
    from napari_medsam.core.build import load_model

    loaded = load_model("test_tiny_vit", device="cpu", precision="fp32")
    vol = np.ascontiguousarray(mni["t1"][:, :, 80:100].transpose(2, 0, 1))  # 20 axial slices, uint8
    return loaded, VolumeEncoder(loaded, vol)


PERMISSIVE = AutoParams(points_per_side=8, points_per_batch=16, pred_iou_thresh=-1e9, stability_score_thresh=0.0)


def test_segment_everything_on_a_real_slice(tiny_vit_mni):
    loaded, enc = tiny_vit_mni
    tf = enc.transform()
    steps, masks = drain_steps(segment_everything(loaded, enc.get(10), tf, params=PERMISSIVE))
    assert steps[-1].step == steps[-1].total == 64 // 16 + 1
    assert masks and all(m.mask.shape == tf.original and m.mask.any() for m in masks)
    assert [m.iou for m in masks] == sorted((m.iou for m in masks), reverse=True)
    boxes = boxes_of(torch.from_numpy(np.stack([m.mask for m in masks])))
    assert len(nms(boxes, torch.tensor([m.iou for m in masks]), PERMISSIVE.box_nms_thresh)) == len(masks)  # no duplicates left
    strict = drain(segment_everything(loaded, enc.get(10), tf,
                                      params=AutoParams(points_per_side=8, pred_iou_thresh=-1e9,
                                                        stability_score_thresh=0.9)))
    assert len(strict) <= len(masks) and all(m.stability >= 0.9 for m in strict)
    assert drain(segment_everything(loaded, enc.get(10), tf, params=AutoParams(points_per_side=4,
                                                                                pred_iou_thresh=1e9))) == []
    labels = drain(segment_everything_slice(enc, 10, params=PERMISSIVE))
    assert labels.shape == tf.original and labels.max() >= 1
    by_hand = labels_from_masks(masks, tf.original)
    np.testing.assert_array_equal(labels, by_hand)
    smallest = min(range(len(masks)), key=lambda i: masks[i].area)
    assert (labels[masks[smallest].mask] == smallest + 1).all()  # painted last: on top


def test_segment_everything_stops_when_cancelled(tiny_vit_mni):
    loaded, enc = tiny_vit_mni
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        drain(segment_everything(loaded, enc.get(3), enc.transform(), params=PERMISSIVE, cancel=stop))


def test_cli_segment_auto_writes_objects_as_labels(tmp_path, mni, capsys):
    import nibabel as nib

    from napari_medsam.cli import main

    img = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(mni["t1"][:, :, 85:95]), mni["affine"]), img)
    out = tmp_path / "auto.nii.gz"
    assert main(["segment", str(img), "--model", "test_tiny_vit", "--axis", "2", "--auto", "4",
                 "--pred-iou-thresh=-1e9", "--stability-thresh=0", "--points-per-side", "8",
                 "--precision", "fp32", "-o", str(out)]) == 0
    labels = np.asanyarray(nib.load(out).dataobj)
    assert labels.shape == (197, 233, 10) and labels[:, :, 4].max() >= 1
    assert not labels[:, :, [0, 1, 2, 3, 5, 6, 7, 8, 9]].any()
    assert "segment everything" in capsys.readouterr().out
    assert main(["segment", str(img), "--model", "litemedsam", "--auto", "4", "-o", str(tmp_path / "x.nii.gz")]) != 0
    assert "box prompts only" in capsys.readouterr().err
