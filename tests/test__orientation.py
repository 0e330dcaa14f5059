"""Radiological views from the scan's affine: MNI152 as stored, and the same scan with its axes
permuted and flipped (a different affine): both show the same pictures."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam import _layers, _orientation
from napari_medsam.io import ImageVolume
from tests._helpers import permuted_scan


def _layer(data, affine):
    from napari.layers import Image

    vol = ImageVolume(data=data, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), affine=affine, rgb=False,
                      source=None, format="nifti")
    d, kwargs, _ = _layers.image_layer_data(vol)
    return Image(d, **kwargs)


def _screen(data, pv, index):
    """The 2D picture napari draws for ``pv`` at slice ``index`` (rows top to bottom, columns left
    to right), from the array alone."""
    order = list(pv.order[-3:])
    img = np.take(data, index, axis=order[0])
    rows = order[1]
    rest = [a for a in range(3) if a != order[0]]
    if rest.index(rows) == 1:  # rows come from the later data axis: transpose
        img = img.T
    if pv.orientation2d[0] == "up":
        img = img[::-1]
    if pv.orientation2d[1] == "left":
        img = img[:, ::-1]
    return img


@pytest.fixture(scope="module")
def mni_small(mni):
    return mni["t1"][::3, ::3, ::3].astype(np.float32), mni["affine"]


def test_mni_axial_view_is_radiological(mni_small):
    data, affine = mni_small
    layer = _layer(data, affine)
    pv = _orientation.plane_view(layer, "axial")
    assert pv is not None and pv.axis == 2 and pv.order == (2, 1, 0)
    assert pv.orientation2d == ("up", "left")
    assert _orientation.plane_of_axis(layer, 2) == "axial"
    assert _orientation.plane_of_axis(layer, 0) == "sagittal"
    # anterior at the top: MNI's frontal lobe (high j) is in the upper half of the picture
    pic = _screen(data, pv, data.shape[2] // 2)
    rows_with_brain = np.flatnonzero(pic.max(axis=1) > 0)
    top_j = data.shape[1] - 1 - rows_with_brain[0]  # rows run from j = max down to 0
    assert data[:, top_j, data.shape[2] // 2].max() > 0
    assert _orientation.plane_view(layer, "coronal").order == (1, 2, 0)
    assert _orientation.plane_view(layer, "sagittal").order == (0, 2, 1)


@pytest.mark.parametrize("plane", _orientation.PLANES)
def test_permuted_flipped_scan_shows_the_same_pictures(mni_small, plane):
    data, affine = mni_small
    # store the same scan as (k, i, j) with i and k reversed: a different array, a different affine
    other, other_affine, n = permuted_scan(data, affine)
    np.testing.assert_allclose(other_affine @ [0, 0, 0, 1], affine @ [n[1] - 1, 0, n[0] - 1, 1])
    a = _orientation.plane_view(_layer(data, affine), plane)
    b = _orientation.plane_view(_layer(other, other_affine), plane)
    mid = data.shape[_orientation._PLANE_NORMAL[plane]] // 2
    ib = {0: n[1] - 1 - mid, 1: mid, 2: n[0] - 1 - mid}[_orientation._PLANE_NORMAL[plane]]
    np.testing.assert_array_equal(_screen(data, a, mid), _screen(other, b, ib))


def test_show_plane_sets_the_viewer_and_names_the_slice(mni_small):
    from napari.components import ViewerModel

    data, affine = mni_small
    viewer = ViewerModel()
    d, kwargs, _ = _layers.image_layer_data(ImageVolume(
        data=data, spacing=(3.0, 3.0, 3.0), origin=(-98.0, -134.0, -72.0), affine=affine, rgb=False,
        source=None, format="nifti"))
    layer = viewer.add_image(d, **kwargs)
    pv = _orientation.show_plane(viewer, layer, "coronal")
    assert tuple(viewer.dims.order) == pv.order == (1, 2, 0)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    assert tuple(str(v) for v in camera.orientation2d) == ("up", "left")
    viewer.dims.set_point(1, layer.data_to_world([0, 20, 0])[1])
    assert _orientation.describe_slice(viewer.dims, layer) == f"coronal slice 20 of {data.shape[1]} (array axis 1)"
    _orientation.show_plane(viewer, layer, "axial")
    assert _orientation.describe_slice(viewer.dims, layer).startswith("axial slice")
    other = ViewerModel()
    plain = other.add_image(np.zeros((4, 5, 6)))
    assert _orientation.show_plane(other, plain, "axial") is None
    assert _orientation.describe_slice(other.dims, plain) == "slice 1 of 4 (array axis 0)"  # napari starts mid-range


def test_radiological_on_open(mni_small):
    from napari.components import ViewerModel

    data, affine = mni_small
    viewer = ViewerModel()
    _orientation.show_radiological_on_open(viewer)
    d, kwargs, _ = _layers.image_layer_data(ImageVolume(
        data=data, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), affine=affine, rgb=False,
        source=None, format="nifti"))
    viewer.add_image(d, **kwargs)
    assert tuple(viewer.dims.order) == (2, 1, 0)
    with pytest.raises(ValueError):
        _orientation.plane_view(viewer.layers[0], "oblique")
