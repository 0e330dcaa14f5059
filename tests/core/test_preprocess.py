import numpy as np
import pytest

from napari_medsam.core.errors import InvalidImageError
from napari_medsam.core.preprocess import (
    CT_WINDOWS,
    Intensity,
    SliceTransform,
    compute_intensity,
    resize_2d,
    to_model_input,
)
from napari_medsam.core.registry import get_spec
from napari_medsam.core.segment import _rc_to_xy

LITE = get_spec("litemedsam")


def test_litemedsam_pipeline_hand_computed_integer_factor():
    # 512 x 384 uint8 image, 2x2 blocks; longest side 512 -> 256, factor exactly 0.5.
    h, w = 512, 384
    img = np.zeros((h, w), np.float32)
    img[0:2, 0:2] = [[0, 1], [1, 1]]          # block mean 0.75 -> OpenCV INTER_AREA rounds to 1
    img[2:4, 0:2] = [[10, 10], [11, 11]]      # mean 10.5 -> rounds half to even -> 10
    img[0:2, 2:4] = 200                        # mean 200 = the max
    x, tf = to_model_input(img, LITE)
    assert tf.resized == (256, 192) and x.shape == (3, 256, 256)
    # min-max over the resized image: min 0 (most blocks), max 200
    assert x[0, 0, 0] == pytest.approx(1 / 200)
    assert x[0, 1, 0] == pytest.approx(10 / 200)
    assert x[0, 0, 1] == pytest.approx(1.0)
    assert np.all(x[:, :, 192:] == 0) and np.all(x[:, 256:, :] == 0)  # padding bottom/right
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])
    # the box is scaled by the same factor and becomes SAM's XYXY
    _, box = _rc_to_xy(tf, np.zeros((0, 2), np.float32), np.array([[100, 50, 300, 250]], np.float32))
    np.testing.assert_allclose(box, [[25, 50, 125, 150]])


def test_litemedsam_pipeline_hand_computed_fractional_factor():
    # 300 x 200: scale 256/300, resized (256, int(200*256/300 + 0.5) = 171)
    img = np.zeros((300, 200), np.float32)
    img[0, 0], img[1, 0], img[0, 1], img[1, 1] = 100, 50, 30, 255
    x, tf = to_model_input(img, LITE)
    assert tf.resized == (256, 171)
    # output pixel (0, 0) covers input rows [0, 1.171875) and cols [0, 200/171):
    sy, sx = 300 / 256, 200 / 171
    wy = np.array([1, sy - 1]) / sy
    wx = np.array([1, sx - 1]) / sx
    expected = np.round(wy @ np.array([[100, 30], [50, 255]]) @ wx)
    resized = np.round(resize_2d(img, tf.resized))
    assert resized[0, 0] == expected
    assert x[0, 0, 0] == pytest.approx(expected / resized.max())  # min-max after the resize (min is 0)


def test_ct_window_presets_and_nan_inf():
    it = compute_intensity(np.array([[-1000, 40, 3000]], np.int16), "ct", window="soft_tissue")
    w, level = CT_WINDOWS["soft_tissue"]
    assert (it.lo, it.hi) == (level - w / 2, level + w / 2)
    out = it.apply(np.array([-1000, 40, 3000, np.nan, np.inf, -np.inf], np.float32))
    np.testing.assert_allclose(out, [0, 127.5, 255, 0, 255, 0])
    lung = compute_intensity(np.zeros((2, 2), np.int16), "ct", window="lung")
    assert (lung.lo, lung.hi) == (-1350, 150)
    with pytest.raises(InvalidImageError, match="presets"):
        compute_intensity(np.zeros((2, 2)), "ct", window="liver-ish")


def test_auto_detects_ct_and_mr():
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 1500, size=(4, 16, 16)).astype(np.int16)
    assert compute_intensity(ct).mode == "ct"
    mr = rng.gamma(2.0, 100.0, size=(4, 16, 16)).astype(np.float32)
    mr[:, :4] = 0
    it = compute_intensity(mr)
    assert it.mode == "mr" and it.keep_zero
    nz = mr[mr != 0]
    assert it.lo == pytest.approx(np.percentile(nz, 0.5), rel=1e-5)
    assert it.hi == pytest.approx(np.percentile(nz, 99.5), rel=1e-5)
    assert np.all(it.apply(mr)[:, :4] == 0)
    assert compute_intensity(np.zeros((8, 8), np.uint8)).mode == "none"
    assert compute_intensity(np.zeros((8, 8, 3), np.uint8), rgb=True).mode == "none"


def test_uint16_and_float_inputs_map_to_0_255():
    for arr in (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000, np.linspace(-3, 7, 64).reshape(8, 8)):
        it = compute_intensity(arr, "minmax")
        out = it.apply(arr)
        assert out.min() == 0 and out.max() == pytest.approx(255)


@pytest.mark.parametrize("shape", [(33, 34), (34, 33), (1, 57), (57, 1), (255, 257), (600, 17)])
def test_mask_maps_back_exactly_for_odd_and_non_square(shape):
    tf = SliceTransform.for_model(shape, LITE)
    assert max(tf.resized) == 256
    import torch

    # a logit map that is +1 inside the content and -1 in the padding comes back all positive
    side = 256
    logits = -torch.ones(side, side)
    logits[: tf.resized[0], : tf.resized[1]] = 1
    back = tf.logits_to_original(logits)
    assert tuple(back.shape) == shape
    assert bool((back > 0).all())


def test_mask_round_trip_keeps_a_rectangle():
    import torch

    shape = (97, 143)
    tf = SliceTransform.for_model(shape, LITE)
    mask = np.zeros(shape, bool)
    mask[20:60, 30:120] = True
    low = tf.mask_to_model_lowres(mask, 256) * 2 - 1  # logits-like
    back = tf.logits_to_original(torch.from_numpy(low)).numpy() > 0
    inter = (back & mask).sum() / (back | mask).sum()
    assert inter > 0.95


def test_squash_transform_for_medsam():
    tf = SliceTransform.for_model((300, 200), get_spec("medsam_vit_b"))
    assert tf.resized == (1024, 1024)
    np.testing.assert_allclose(tf.rc_to_model(np.array([[150, 100]])), [[512, 512]])


def test_bad_slices_raise():
    with pytest.raises(InvalidImageError):
        to_model_input(np.zeros((4, 4, 5), np.float32), LITE)
    with pytest.raises(InvalidImageError):
        to_model_input(np.zeros((0, 4), np.float32), LITE)


def test_intensity_key_names_the_choice():
    assert Intensity("ct", -160, 240).key() != Intensity("ct", -1350, 150).key()


# ---- degenerate images (issue 17) -------------------------------------------------------------


@pytest.mark.parametrize("dtype,values", [(np.int16, (0, 100)), (bool, (False, True)), (np.float32, (0.0, 1.0)),
                                          (np.uint16, (0, 7, 900)), (np.uint8, (0, 1))])
def test_few_valued_images_keep_their_contrast_under_auto(dtype, values):
    rng = np.random.default_rng(0)
    img = np.asarray(values, dtype=dtype)[rng.integers(0, len(values), (4, 20, 20))]
    it = compute_intensity(img)
    assert it.mode == "minmax"
    mapped = it.apply(img)
    assert mapped.min() == 0 and mapped.max() == pytest.approx(255)
    assert len(np.unique(mapped)) == len(values)  # every value keeps its own grey


def test_mr_percentiles_that_collapse_fall_back_to_minmax():
    img = np.zeros((4, 50, 50), np.float32)
    img[:, 10:40, 10:40] = 5.0  # 3600 voxels of one value ...
    img[0, 0, :10] = np.linspace(1, 4, 10)  # ... and 10 below and 10 above it (< 0.5 % of the non-zero
    img[0, 1, :10] = np.linspace(6, 39, 10)  # voxels each): both percentiles are 5
    it = compute_intensity(img, "mr")
    assert it.mode == "minmax" and (it.lo, it.hi) == (0.0, 39.0)
    assert compute_intensity(img).mode == "minmax"


@pytest.mark.parametrize("volume,phrase", [(np.full((3, 8, 8), 7, np.int16), "single value 7"),
                                           (np.full((3, 8, 8), np.nan, np.float32), "no finite value")])
def test_nothing_to_segment_is_logged(caplog, volume, phrase):
    with caplog.at_level("WARNING", logger="napari_medsam.core.preprocess"):
        compute_intensity(volume)
    assert phrase in caplog.text and "nothing to segment" in caplog.text


def test_a_normal_image_logs_nothing(caplog):
    img = np.random.default_rng(1).gamma(2.0, 100.0, (4, 16, 16)).astype(np.float32)
    with caplog.at_level("WARNING", logger="napari_medsam.core.preprocess"):
        assert compute_intensity(img).mode == "mr"
    assert caplog.text == ""


def test_axis_out_of_range_is_a_typed_error():
    from napari_medsam.core.errors import InvalidImageError

    vol = np.zeros((3, 8, 8), np.float32)
    for axis in (3, 7, -4):
        with pytest.raises(InvalidImageError, match=f"slice axis {axis} does not exist"):
            compute_intensity(vol, "mr", axis=axis)


def test_elongated_slice_keeps_a_row_and_zero_sizes_are_refused():
    from napari_medsam.core.errors import InvalidImageError
    from napari_medsam.core.preprocess import SliceTransform, _area_matrix
    from napari_medsam.core.registry import get_spec

    spec = get_spec("litemedsam")
    tf = SliceTransform.for_model((1, 4000), spec)
    assert tf.resized == (1, 256)
    x, _ = to_model_input(np.random.default_rng(0).uniform(0, 255, (1, 4000)).astype(np.float32), spec)
    assert np.isfinite(x).all()
    with pytest.raises(InvalidImageError):
        _area_matrix(10, 0)
