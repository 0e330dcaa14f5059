"""OME-Zarr image + label pyramids: NGFF metadata, geometry per level, napari-ome-zarr reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medsam.core.errors import InvalidImageError
from napari_medsam.io import ImageVolume, read_image
from napari_medsam.io.ome_zarr import pyramid_factors, write_ome_zarr


@pytest.fixture(scope="module")
def scan(mni):
    """The MNI T1 every 2nd voxel (99 x 117 x 95) with its affine, and a two-class label array."""
    data = np.asarray(mni["t1"][::2, ::2, ::2])
    affine = mni["affine"] @ np.diag([2.0, 2.0, 2.0, 1.0])
    brain = mni["brain"][::2, ::2, ::2]
    labels = np.zeros(data.shape, np.uint8)
    labels[brain] = 1
    labels[brain & (np.arange(data.shape[0]) < data.shape[0] // 2)[:, None, None]] = 2
    return ImageVolume.from_array(data, spacing=(2.0, 2.0, 2.0), origin=affine[:3, 3], affine=affine), labels


def test_pyramid_levels():
    assert pyramid_factors((99, 117, 95)) == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)]
    assert pyramid_factors((20, 15)) == [(1, 1), (2, 2)]  # 8 x 10 is still a level
    assert pyramid_factors((12, 10)) == [(1, 1)]
    assert pyramid_factors((5, 64, 64), levels=2) == [(1, 1, 1), (1, 2, 2)]


def test_ngff_layout_and_metadata(scan, tmp_path):
    image, labels = scan
    path = write_ome_zarr(tmp_path / "brain.ome.zarr", image, {"tissue": labels}, class_names={1: "right", 2: "left"})
    root = json.loads((path / ".zattrs").read_text())
    (ms,) = root["multiscales"]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert len(ms["datasets"]) == 4
    for level, ds in enumerate(ms["datasets"]):
        scale, shift = ds["coordinateTransformations"]
        f = 2**level
        assert scale["scale"] == [2.0, 2.0 * f, 2.0 * f]
        # the centre of voxel 0 of a level sits at the centre of the voxels it averages
        np.testing.assert_allclose(shift["translation"], image.origin + np.array([0, 1, 1]) * (f - 1))
    assert json.loads((path / "labels" / ".zattrs").read_text())["labels"] == ["tissue"]
    lab = json.loads((path / "labels" / "tissue" / ".zattrs").read_text())
    assert lab["image-label"]["properties"] == [{"label-value": 1, "class": "right"},
                                                 {"label-value": 2, "class": "left"}]
    assert [c["label-value"] for c in lab["image-label"]["colors"]] == [1, 2]
    assert all(len(c["rgba"]) == 4 for c in lab["image-label"]["colors"])
    # our reader: the image at the root, the labels at labels/<name>, the affine kept
    back = read_image(path)
    np.testing.assert_array_equal(back.data[...], image.data)
    np.testing.assert_allclose(back.affine, image.affine)
    back_labels = read_image(path / "labels" / "tissue")
    np.testing.assert_array_equal(back_labels.data[...], labels)
    assert back_labels.spacing == image.spacing


def test_napari_ome_zarr_shows_labels_over_the_image_at_every_scale(scan, tmp_path):
    from napari_ome_zarr import napari_get_reader

    image, labels = scan
    path = write_ome_zarr(tmp_path / "brain.ome.zarr", image, {"tissue": labels}, class_names={1: "a", 2: "b"})
    reader = napari_get_reader(str(path))
    assert reader is not None
    layers = reader(str(path))
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "labels"]
    (img_data, img_kw, _), (lab_data, lab_kw, _) = layers
    shapes = [(99, 117, 95), (99, 59, 48), (99, 30, 24), (99, 15, 12)]
    assert [tuple(d.shape) for d in img_data] == shapes
    assert [tuple(d.shape) for d in lab_data] == shapes  # every label scale matches the image's
    np.testing.assert_array_equal(np.asarray(lab_data[0]), labels)
    np.testing.assert_array_equal(np.asarray(lab_data[2]), labels[:, ::4, ::4])  # nearest, no new values
    np.testing.assert_allclose(lab_kw["scale"], img_kw["scale"])
    assert lab_kw.get("affine") is None or np.allclose(lab_kw["affine"], img_kw["affine"])
    assert "a" in str(lab_kw.get("properties")) and "b" in str(lab_kw.get("properties"))


def test_refuses_mismatched_labels(scan, tmp_path):
    image, labels = scan
    with pytest.raises(InvalidImageError, match="shape"):
        write_ome_zarr(tmp_path / "x.ome.zarr", image, {"bad": labels[:-1]})
    with pytest.raises(InvalidImageError, match="plain folder name"):
        write_ome_zarr(tmp_path / "x.ome.zarr", image, {"../up": labels})
    assert not (tmp_path / "x.ome.zarr").exists()


def test_napari_writer_saves_image_and_labels(scan, tmp_path):
    from napari_medsam import _writer

    image, labels = scan
    layers = [(np.asarray(image.data), {"name": "T1", "scale": image.spacing, "translate": image.origin,
                                        "metadata": {}}, "image"),
              (labels, {"name": "brain parts", "metadata": {}}, "labels")]
    (out,) = _writer.write_ome_zarr_image_labels(str(tmp_path / "s.ome.zarr"), layers)
    assert json.loads((tmp_path / "s.ome.zarr" / "labels" / ".zattrs").read_text())["labels"] == ["brain_parts"]
    back = read_image(out)
    assert back.spacing == image.spacing and back.origin == pytest.approx(image.origin)
