import numpy as np
import pytest

from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import PromptError
from napari_medsam.core.segment import (
    Prompt2D,
    _rc_to_xy,
    box_of,
    decode,
    segment_slice,
)
from tests.conftest import dice


@pytest.fixture()
def enc(tiny_lite):
    rng = np.random.default_rng(0)
    return VolumeEncoder(tiny_lite, rng.random((9, 45, 31)).astype(np.float32))


def test_masks_come_back_on_the_original_grid(enc):
    res = segment_slice(enc, 4, [Prompt2D.from_box((5, 4, 30, 20)), Prompt2D.from_points([[10, 10]], [1])])
    assert len(res) == 2
    for r in res:
        assert r.mask.shape == (45, 31) and r.mask.dtype == bool
        assert r.logits.shape == (64, 64)
        assert np.isfinite(r.iou)


def test_batched_boxes_equal_one_by_one(enc):
    boxes = [Prompt2D.from_box((5, 4, 30, 20)), Prompt2D.from_box((1, 1, 40, 30)), Prompt2D.from_box((20, 10, 44, 30))]
    together = segment_slice(enc, 2, boxes)
    for p, r in zip(boxes, together, strict=True):
        alone = segment_slice(enc, 2, [p])[0]
        np.testing.assert_allclose(alone.logits, r.logits, atol=1e-4)


def test_single_point_uses_multimask_and_best_iou(enc, monkeypatch):
    seen = []
    dec = enc.loaded.model.mask_decoder
    real = dec.forward

    def spy(*a, **kw):
        seen.append(kw.get("multimask_output"))
        return real(*a, **kw)

    monkeypatch.setattr(dec, "forward", spy)
    segment_slice(enc, 0, [Prompt2D.from_points([[10, 10]], [1])])
    segment_slice(enc, 0, [Prompt2D.from_points([[10, 10], [20, 20]], [1, 0])])
    segment_slice(enc, 0, [Prompt2D.from_box((1, 1, 9, 9))])
    assert seen == [True, False, False]


def test_the_one_flip_row_col_to_xy(enc):
    tf = enc.transform()
    pts, box = _rc_to_xy(tf, np.array([[10.0, 20.0]]), np.array([[1.0, 2.0, 30.0, 25.0]]))
    s = 64 / 45
    np.testing.assert_allclose(pts, [[20 * s, 10 * s]], rtol=1e-5)
    np.testing.assert_allclose(box, [[2 * s, 1 * s, 25 * s, 30 * s]], rtol=1e-5)


def test_previous_logits_are_a_valid_prompt(enc):
    first = segment_slice(enc, 3, [Prompt2D.from_box((5, 4, 30, 20))])[0]
    again = segment_slice(enc, 3, [Prompt2D(box=(5, 4, 30, 20), mask_logits=first.logits)])[0]
    assert again.mask.shape == first.mask.shape


@pytest.mark.parametrize("bad", [
    Prompt2D(),
    Prompt2D.from_box((10, 10, 5, 20)),
    Prompt2D.from_points([[100, 5]], [1]),
    Prompt2D.from_points([[5, 5]], [2]),
    Prompt2D(points=np.zeros((2, 2), np.float32), labels=np.zeros(1, np.int64)),
])
def test_bad_prompts_are_refused(enc, bad):
    with pytest.raises(PromptError):
        segment_slice(enc, 0, [bad])


def test_box_of():
    m = np.zeros((10, 12), bool)
    assert box_of(m) is None
    m[2:5, 3:9] = True
    assert box_of(m) == (2, 3, 5, 9)
    assert box_of(m, 3) == (0, 0, 8, 12)


def _box(mask):
    b = box_of(mask)
    assert b is not None
    return b


@pytest.mark.slow
def test_real_box_on_mni_brain(litemedsam, mni):
    """A box around the brain on coronal MNI152 slices: measured mean Dice 0.68 (5 slices)."""
    enc = VolumeEncoder(litemedsam, mni["t1"], axis=1)
    scores = []
    for z in (70, 93, 116, 139, 162):
        gt = mni["brain"][:, z, :]
        res = decode(litemedsam, enc.get(z), enc.transform(), [Prompt2D.from_box(_box(gt))])[0]
        scores.append(dice(res.mask, gt))
    assert np.mean(scores) > 0.55, scores
    assert min(scores) > 0.4, scores


def test_decode_all_gives_every_output_the_first_being_decodes(enc):
    from napari_medsam.core.segment import decode_all

    tf = enc.transform()
    emb = enc.get(3)
    for p in (Prompt2D.from_box((5, 4, 30, 20)), Prompt2D(points=np.array([[12.0, 9.0]], np.float32),
                                                          labels=np.ones(1, np.int64), box=(5, 4, 30, 20))):
        outs = decode_all(enc.loaded, emb, tf, p, return_prob=True)
        assert len(outs) == enc.loaded.model.mask_decoder.num_mask_tokens
        one = decode(enc.loaded, emb, tf, [p], multimask=False)[0]
        np.testing.assert_allclose(outs[0].logits, one.logits, atol=1e-4)
        assert outs[0].iou == pytest.approx(one.iou, abs=1e-4)
        many = decode(enc.loaded, emb, tf, [p], multimask=True)[0]
        best = max(outs[1:], key=lambda r: r.iou)
        np.testing.assert_allclose(best.logits, many.logits, atol=1e-4)
        for r in outs:
            assert r.mask.shape == (45, 31) and r.prob.shape == (45, 31)
