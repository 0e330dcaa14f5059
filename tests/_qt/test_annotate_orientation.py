"""The Annotate dock and the scan's orientation (issue 16 items 2 and 5): a scan with an anatomical
affine opens in the axial radiological view, Axial / Coronal / Sagittal are one click away, the
slice line names the slice under view along the axis sliced now, prompts land on that slice, and
the exported labels keep the scan's array order. The box tool is active when the dock opens.

Real data: the MNI152 T1 template (every third voxel) stored with its axes permuted and two of them
reversed, as a scanner may write it: an affine that is not diagonal in the usual order.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_medsam import _layers, _orientation
from tests._helpers import permuted_scan

from .conftest import PLUGIN

pytestmark = pytest.mark.gui


@pytest.fixture
def permuted_mni(mni, tmp_path):
    """The MNI template stored as (k, i, j) with i and k reversed; (path, data, affine)."""
    data = np.ascontiguousarray(mni["t1"][::3, ::3, ::3].astype(np.float32))
    affine = mni["affine"] @ np.diag([3.0, 3.0, 3.0, 1.0])
    other, other_affine, _n = permuted_scan(data, affine)
    path = tmp_path / "permuted.nii.gz"
    img = nib.Nifti1Image(other, other_affine)
    img.set_sform(other_affine, code=2)
    img.set_qform(other_affine, code=1)
    nib.save(img, path)
    return path, other, other_affine


def _preview_after(qtbot, annot, n_before):
    qtbot.waitUntil(lambda: annot.previews_shown > n_before, timeout=60_000)
    return annot._last[1]


def test_scan_opens_axial_planes_switch_and_labels_keep_the_array_order(viewer, widgets, qtbot, permuted_mni,
                                                                         tmp_path):
    path, data, affine = permuted_mni
    annot = widgets.annot
    image = viewer.open(str(path), plugin=PLUGIN)[0]
    assert annot.image_layer is image
    axial = _orientation.plane_view(image, "axial")
    assert axial.axis == 0  # the permuted file keeps S-I first
    assert tuple(viewer.dims.order) == axial.order  # opened axial, without asking
    assert _layers.current_slice(viewer.dims, image).axis == 0
    qtbot.waitUntil(lambda: "axial slice" in annot.status_label.text(), timeout=10_000)
    assert all(b.isEnabled() for b in annot.plane_buttons.values())

    # one click: coronal; the slice line follows the view at once
    qtbot.mouseClick(annot.plane_buttons["coronal"], Qt.MouseButton.LeftButton)
    coronal = _orientation.plane_view(image, "coronal")
    assert tuple(viewer.dims.order) == coronal.order and coronal.axis == 2
    z = 30
    viewer.dims.set_point(coronal.axis, image.data_to_world([0, 0, z])[coronal.axis])
    view = _layers.current_slice(viewer.dims, image)
    assert (view.axis, view.index) == (2, z)
    assert f"coronal slice {z} of {data.shape[2]} (array axis 2)" in annot.status_label.text()

    # a box on this coronal slice -> a preview and a commit on slice z along array axis 2 only
    _, shp = annot.prompt_layers()
    n = annot.previews_shown
    r0, c0, r1, c1 = 8, 10, 40, 45  # rows along array axis 0, columns along array axis 1
    shp.add_rectangles(np.array([[r0, c0, z], [r0, c1, z], [r1, c1, z], [r1, c0, z]], float))
    res = _preview_after(qtbot, annot, n)
    assert res.mask.shape == (data.shape[0], data.shape[1]) and res.mask.any()
    annot.commit()
    labels = annot.labels_layer
    np.testing.assert_array_equal(labels.data[:, :, z] == 1, res.mask)
    assert np.flatnonzero(labels.data.any(axis=(0, 1))).tolist() == [z]

    # back to axial: the line names the axial slice again, never the coronal one
    qtbot.mouseClick(annot.plane_buttons["axial"], Qt.MouseButton.LeftButton)
    assert _layers.current_slice(viewer.dims, image).axis == 0
    assert "axial slice" in annot.status_label.text() and "array axis 2" not in annot.status_label.text()

    # written labels are in the scan's array order with the scan's affine
    out = tmp_path / "labels.nii.gz"
    labels.save(str(out), plugin=PLUGIN)
    back = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels.data)
    assert back.shape == data.shape
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)


def test_plane_buttons_need_an_affine(viewer, widgets):
    annot = widgets.annot
    plain = viewer.add_image(np.zeros((4, 16, 16), np.float32))
    annot.image_combo.set_layer(plain)
    assert not any(b.isEnabled() for b in annot.plane_buttons.values())
    assert annot.show_plane("coronal") is None
    assert tuple(viewer.dims.order) == (0, 1, 2)  # unchanged
    assert "no anatomical affine" in annot.hint_label.text()


def test_dock_opened_on_a_scan_shows_it_axial_with_the_box_tool(make_napari_viewer, qtbot, permuted_mni):
    """Open the scan first (as File > Open does), then the dock: axial view, our reader preferred
    for the medical formats from now on (a choice the user made stays), the box layer active in
    rectangle mode, and a mouse drag on the canvas draws a box (it does not pan)."""
    from napari.settings import get_settings

    path, _data, _affine = permuted_mni
    viewer = make_napari_viewer(show=True)
    get_settings().plugins.extension2reader = {"*.nrrd": "napari"}  # the user's own choice
    image = viewer.open(str(path), plugin=PLUGIN)[0]
    assert tuple(viewer.dims.order) == (0, 1, 2)  # napari alone: the array order
    _, annot = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate")
    prefs = get_settings().plugins.extension2reader
    assert prefs["*.nii.gz"] == prefs["*.nii"] == prefs["*.dcm"] == PLUGIN
    assert prefs["*.nrrd"] == "napari" and "*.tif" not in prefs
    assert tuple(viewer.dims.order) == _orientation.plane_view(image, "axial").order
    _, shp = annot.prompt_layers(create=False)
    assert viewer.layers.selection.active is shp and shp.mode == "add_rectangle"
    annot.session.load_model("test_tiny_lite")  # the box below previews: not with the default model
    cam = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera = cam.center, cam.zoom
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    qtbot.waitExposed(viewer.window._qt_viewer)
    w, h = canvas.size
    start, end = np.array([w * 0.45, h * 0.45]), np.array([w * 0.55, h * 0.55])
    canvas.events.mouse_press(pos=start, modifiers=(), button=1)
    for t in np.linspace(0, 1, 5)[1:]:
        canvas.events.mouse_move(pos=start + t * (end - start), modifiers=(), button=1,
                                 press_event=None, buttons=[1])
    canvas.events.mouse_release(pos=end, modifiers=(), button=1)
    assert len(shp.data) == 1 and shp.shape_type == ["rectangle"]
    assert (cam.center, cam.zoom) == camera  # no pan
    qtbot.waitUntil(lambda: annot.previews_shown > 0, timeout=60_000)  # no job left for the next test
    assert annot.load_job is None
