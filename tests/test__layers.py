"""napari layers <-> core values, on napari layer objects (no viewer, no display needed)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import Dims
from napari.layers import Image, Labels, Points, Shapes

from napari_medsam import _layers
from napari_medsam.io import ImageVolume

SCALE = (2.5, 0.8, 0.5)
TRANSLATE = (10.0, -4.0, 3.0)


@pytest.fixture
def image():
    return Image(np.zeros((7, 20, 30), np.int16), scale=SCALE, translate=TRANSLATE, name="ct")


def _dims_for(image, order=(0, 1, 2)) -> Dims:
    """Dims spanning the image's world extent (a point outside the range would be clamped)."""
    lo, hi = image.extent.world
    step = image.scale
    return Dims(ndim=3, order=order, range=tuple((float(a), float(b), float(s)) for a, b, s in zip(lo, hi, step, strict=True)))


def _dims_at(image, z: int, order=(0, 1, 2)) -> Dims:
    dims = _dims_for(image, order)
    dims.point = tuple(image.data_to_world([z, 0, 0]))
    return dims


def test_current_slice_follows_the_dims_point_with_scale_and_translate(image):
    view = _layers.current_slice(_dims_at(image, 4), image)
    assert view == _layers.SliceView(axis=0, index=4, is_3d=True, rc_axes=(1, 2), n_slices=7)


def test_current_slice_handles_dims_order(image):
    dims = _dims_for(image, order=(2, 0, 1))  # slicing along the last data axis
    dims.point = tuple(image.data_to_world([0, 0, 17]))
    view = _layers.current_slice(dims, image)
    assert (view.axis, view.index, view.rc_axes) == (2, 17, (0, 1))


def test_current_slice_outside_the_layer_is_none(image):
    dims = Dims(ndim=3, range=((0.0, 2000.0, 1.0), (0.0, 10.0, 1.0), (0.0, 10.0, 1.0)))
    dims.point = (1000.0, 0.0, 0.0)
    assert _layers.current_slice(dims, image) is None


def test_2d_and_rgb_images_are_one_slice():
    rgb = Image(np.zeros((12, 14, 3), np.uint8), rgb=True)
    view = _layers.current_slice(Dims(ndim=2), rgb)
    assert view == _layers.SliceView(axis=0, index=0, is_3d=False, rc_axes=(0, 1), n_slices=1)
    assert _layers.spatial_shape(rgb) == (12, 14)
    vol = _layers.image_volume(rgb)
    assert vol.rgb and vol.spatial_shape == (12, 14)


def test_prompts_map_world_to_image_pixels(image):
    # prompt layers with a different (unit) transform than the image: conversion goes through world
    pts = Points(np.array([image.data_to_world([4, 5, 6]), image.data_to_world([4, 9, 2]),
                           image.data_to_world([3, 1, 1])]), features={"positive": [True, False, True]})
    corners = np.array([image.data_to_world(c) for c in ([4, 2, 3], [4, 2, 13], [4, 12, 13], [4, 12, 3])])
    shp = Shapes([corners], shape_type="rectangle")
    view = _layers.current_slice(_dims_at(image, 4), image)
    prompt = _layers.slice_prompt(pts, shp, image, view)
    np.testing.assert_allclose(prompt.points, [[5, 6], [9, 2]], atol=1e-5)
    np.testing.assert_array_equal(prompt.labels, [1, 0])
    np.testing.assert_allclose(prompt.box, (2, 3, 12, 13), atol=1e-5)
    assert _layers.prompted_slices(pts, shp, image, view) == [3, 4]
    other = _layers.slice_prompt(pts, shp, image, _layers.with_index(view, 5))
    assert other is None


def test_remove_prompts_on_one_slice(image):
    pts = Points(np.array([[4, 1, 1], [3, 2, 2], [4, 5, 5]], float), scale=SCALE, translate=TRANSLATE,
                 features={"positive": [True, True, False]})
    shp = Shapes([np.array([[4, 1, 1], [4, 1, 5], [4, 5, 5], [4, 5, 1]], float)], shape_type="rectangle",
                 scale=SCALE, translate=TRANSLATE)
    view = _layers.current_slice(_dims_at(image, 4), image)
    _layers.remove_prompts(pts, shp, image, view)
    np.testing.assert_allclose(pts.data, [[3, 2, 2]])
    assert len(shp.data) == 0
    _layers.remove_prompts(pts, shp, image, None)
    assert len(pts.data) == 0


def test_paint_keeps_other_labels_and_undo_restores(image):
    labels = Labels(np.zeros((7, 20, 30), np.uint16))
    labels.data[4, 0:5, 0:5] = 3  # another structure the user drew
    view = _layers.SliceView(axis=0, index=4, is_3d=True, rc_axes=(1, 2), n_slices=7)
    mask = np.zeros((20, 30), bool)
    mask[2:8, 2:8] = True
    edit = _layers.paint_masks(labels, view, {4: mask}, 1)
    assert (labels.data[4, 0:5, 0:5] == 3).all()  # untouched
    assert edit.n_voxels == 36 - 9
    assert (labels.data[4] == 1).sum() == 27 and labels.data[[0, 1, 2, 3, 5, 6]].sum() == 0
    _layers.undo_edit(labels, edit)
    assert (labels.data == 1).sum() == 0 and (labels.data == 3).sum() == 25


def test_paint_along_another_axis():
    labels = Labels(np.zeros((4, 5, 6), np.uint8))
    view = _layers.SliceView(axis=2, index=3, is_3d=True, rc_axes=(0, 1), n_slices=6)
    mask = np.zeros((4, 5), bool)
    mask[1, 2] = True
    _layers.paint_masks(labels, view, {3: mask, 5: mask}, 9)
    assert labels.data[1, 2, 3] == 9 and labels.data[1, 2, 5] == 9 and labels.data.sum() == 18


def test_new_labels_keep_the_reference_geometry(tmp_path):
    vol = ImageVolume.from_array(np.zeros((3, 4, 5), np.int16), spacing=(2.0, 1.0, 0.5), origin=(1, 2, 3),
                                 affine=np.diag([2.0, 1.0, 0.5, 1.0]))
    data, kwargs, _ = _layers.image_layer_data(vol, name="ct")
    img = Image(data, **{k: v for k, v in kwargs.items() if k != "colormap"})
    kw = _layers.new_labels_kwargs(img)
    assert kw["data"].shape == (3, 4, 5) and kw["scale"] == (2.0, 1.0, 0.5)
    ref = _layers.layer_reference(kw, (3, 4, 5))
    assert ref is vol
    assert _layers.layer_reference(kw, (9, 9, 9)).spacing == (2.0, 1.0, 0.5)


def test_image_volume_follows_replaced_data(image):
    vol = ImageVolume.from_array(np.ones((7, 20, 30)), spacing=SCALE, origin=TRANSLATE)
    image.metadata = {"napari_medsam": {"volume": vol}}
    assert _layers.image_volume(image).data is image.data  # stored geometry, current data
    image.data = np.zeros((2, 3, 4))
    assert _layers.image_volume(image).spatial_shape == (2, 3, 4)


def test_unwrap_public_proxy():
    from napari.utils._proxies import PublicOnlyProxy

    obj = Image(np.zeros((3, 3)))
    assert _layers.unwrap(PublicOnlyProxy(obj)) is obj
