"""Zoom (``core.zoom``): the window around a small box, prompts moved into it, masks pasted back,
and propagation decoding every slice of a small object's run on such windows."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.core import zoom
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import PromptError
from napari_medsam.core.progress import drain
from napari_medsam.core.propagation import PropagationParams, propagate
from napari_medsam.core.segment import MaskResult, Prompt2D, segment_slice


def test_the_window_is_a_square_around_the_box_inside_the_slice():
    assert zoom.zoom_window((40, 50, 50, 70), (200, 180)) == (25, 40, 65, 80)  # 2 x the longer side 20
    r0, c0, r1, c1 = zoom.zoom_window((0, 170, 10, 180), (200, 180))  # at a corner: moved inside
    assert (r0, c0, r1 - r0, c1 - c0) == (0, 148, 32, 32)  # and at least MIN_SIDE
    assert zoom.zoom_window((10, 10, 150, 150), (200, 180)) is None  # would not magnify 1.5x
    assert zoom.zoom_window((40, 50, 50, 70), (200, 180), context=4.0) == (5, 20, 85, 100)
    assert zoom.zoom_window(None, (200, 180)) is None


def test_prompt_bounds_hold_the_box_and_the_positive_points_only():
    p = Prompt2D(points=np.array([[5, 6], [90, 90]], np.float32), labels=np.array([1, 0]), box=(10, 10, 20, 30))
    assert zoom.prompt_bounds(p) == (5.0, 6.0, 20.0, 30.0)
    assert zoom.prompt_bounds(Prompt2D.from_points([[3, 4]], [1])) == (3.0, 4.0, 4.0, 5.0)
    assert zoom.prompt_bounds(Prompt2D.from_points([[3, 4]], [0])) is None


def test_shift_moves_prompts_into_the_window_and_drops_points_outside_it():
    p = Prompt2D(points=np.array([[30, 45], [150, 10]], np.float32), labels=np.array([1, 0]), box=(28, 42, 40, 60))
    local = zoom._shift(p, (20, 40, 60, 80))
    assert local.box == (8, 2, 20, 20)
    assert local.points.tolist() == [[10.0, 5.0]] and local.labels.tolist() == [1]


@pytest.fixture()
def enc(loaded):
    rng = np.random.default_rng(3)
    return VolumeEncoder(loaded, rng.random((5, 120, 100)).astype(np.float32))


def test_decode_zoomed_pastes_the_windows_mask_on_the_slice_grid(enc, monkeypatch):
    box = (50.0, 40.0, 62.0, 58.0)
    win = zoom.zoom_window(box, enc.slice_shape)
    assert win is not None
    assert not enc.has_window(2, win)
    (res,), emb = zoom.decode_zoomed(enc, 2, Prompt2D.from_box(box), win, return_prob=True)
    assert enc.has_window(2, win) and not enc.has_window(1, win)
    r0, c0, r1, c1 = win
    assert res.mask.shape == res.prob.shape == (120, 100)
    outside = np.ones((120, 100), bool)
    outside[r0:r1, c0:c1] = False
    assert not res.mask[outside].any() and not res.prob[outside].any()
    assert tuple(emb.shape[-2:]) == (16, 16)  # the tiny model's grid, for the window
    # the same as decoding the window cut out as an image of its own, with the volume's intensities
    crop = VolumeEncoder(enc.loaded, enc.raw_slice(2)[r0:r1, c0:c1], intensity=enc.intensity)
    own = segment_slice(crop, 0, [Prompt2D.from_box((box[0] - r0, box[1] - c0, box[2] - r0, box[3] - c0))])[0]
    np.testing.assert_array_equal(res.mask[r0:r1, c0:c1], own.mask)
    calls = []
    monkeypatch.setattr("napari_medsam.core.encoder.run_encoder", lambda *a: calls.append(1))
    zoom.decode_zoomed(enc, 2, Prompt2D.from_box(box), win, all_outputs=True)
    assert calls == []  # the window's embedding is remembered
    assert not enc.cached_indices()  # and no slice embedding was computed or cached


def test_propagation_with_zoom_decodes_each_slice_of_a_small_run_on_a_window(enc, monkeypatch):
    windows = []
    real = VolumeEncoder.embed_window

    def spy(self, index, window):
        windows.append((index, window))
        return real(self, index, window)

    monkeypatch.setattr(VolumeEncoder, "embed_window", spy)

    def small(loaded, emb, tf, prompts, return_prob=False, **kw):  # a scripted decoder: the box's own pixels
        r0, c0, r1, c1 = (int(round(v)) for v in prompts[0].box)
        m = np.zeros(tf.original, bool)
        m[r0 + 2:r1 - 2, c0 + 2:c1 - 2] = True
        return [MaskResult(mask=m, logits=np.zeros((64, 64), np.float32), iou=0.9,
                           prob=m.astype(np.float32) if return_prob else None)]

    monkeypatch.setattr(zoom, "decode", small)
    params = PropagationParams.permissive(zoom=2.0)
    out = drain(propagate(enc, {2: Prompt2D.from_box((50, 40, 62, 58))}, params=params))
    assert set(out) == set(range(5))
    assert [z for z, _ in windows] == [2, 1, 0, 3, 4]  # every slice came from a window, once
    assert windows[0][1] == (38, 31, 74, 67)  # 2 x the seed box's longer side, 18
    assert all(w[2] - w[0] == w[3] - w[1] <= 120 / zoom.MIN_GAIN for _, w in windows)  # squares that magnify
    assert not enc.cached_indices()  # the slices' own embeddings were never needed
    windows.clear()
    drain(propagate(enc, {2: Prompt2D.from_box((5, 5, 115, 95))}, params=params))
    assert windows == []  # a box as large as the slice gains nothing: the slices' embeddings
    with pytest.raises(PromptError, match="similar_q"):
        drain(propagate(enc, {2: Prompt2D.from_box((50, 40, 62, 58))}, params=PropagationParams(zoom=2.0, similar_q=0.5)))


def test_a_zoomed_run_keeps_the_seeds_magnification_unless_told_not_to(enc, monkeypatch):
    """The object shrinks slice by slice: with ``zoom_fixed`` (the default) the windows stay as
    large as the seed's (the same scale, features comparable with the seed's); without it each
    window follows its carried box down to the least side."""
    sides = []
    real = VolumeEncoder.embed_window

    def spy(self, index, window):
        sides.append(window[2] - window[0])
        return real(self, index, window)

    def shrinking(loaded, emb, tf, prompts, return_prob=False, **kw):  # a 4 x 4 dot at the box's centre
        r0, c0, r1, c1 = prompts[0].box
        r, c = int((r0 + r1) / 2), int((c0 + c1) / 2)
        m = np.zeros(tf.original, bool)
        m[r - 2:r + 2, c - 2:c + 2] = True
        return [MaskResult(mask=m, logits=np.zeros((64, 64), np.float32), iou=0.9,
                           prob=m.astype(np.float32) if return_prob else None)]

    monkeypatch.setattr(VolumeEncoder, "embed_window", spy)
    monkeypatch.setattr(zoom, "decode", shrinking)
    seed = {2: Prompt2D.from_box((50, 40, 62, 58))}
    drain(propagate(enc, seed, params=PropagationParams.permissive(zoom=2.0)))
    assert sides[0] == 36 and len(sides) > 1 and min(sides) == 36
    sides.clear()
    drain(propagate(enc, seed, params=PropagationParams.permissive(zoom=2.0, zoom_fixed=False)))
    assert sides[0] == 36 and min(sides) == zoom.MIN_SIDE  # the dot's box, twice, is less

