"""The npe2 contributions without a viewer: manifest, reader, writers, sample data.

Real data: nilearn's MNI152 T1 (1 mm, sform code 2) and a small NIfTI with an oblique, anisotropic
affine and both qform and sform set. Geometry round trips compare affines to 1e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_medsam import _layers, _reader, _sample_data, _writer
from napari_medsam.io import ImageVolume, read_image

from .conftest import MNI_T1

ROOT = Path(__file__).resolve().parents[1]


def _oblique_nifti(path: Path, shape=(9, 33, 34)) -> tuple[np.ndarray, np.ndarray]:
    """An int16 'CT' with 0.7 x 0.8 x 2.5 mm voxels, rotated 10 degrees, qform and sform set."""
    rng = np.random.default_rng(0)
    data = (rng.normal(40, 20, size=shape)).astype(np.int16)
    data[:, 10:20, 12:25] = 300
    t = np.deg2rad(10)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = (-12.5, 30.25, -70.0)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, path)
    return data, affine


# ---- manifest -----------------------------------------------------------------------------------


def test_manifest_validates_and_names_commands():
    from npe2 import PluginManifest

    pm = PluginManifest.from_file(ROOT / "napari.yaml")
    assert pm.name == "napari-medsam"
    ids = {c.id for c in pm.contributions.commands}
    for widget in ("model_widget", "annotation_widget", "finetune_widget", "review_widget"):
        assert f"napari-medsam.make_{widget}" in ids
    assert {w.display_name for w in pm.contributions.widgets} == {"Model", "Annotate", "Fine-tune", "Review"}
    assert {s.key for s in pm.contributions.sample_data} == {"mni152", "synthetic"}
    pm.validate_imports()  # every python_name resolves


def test_npe2_validate_cli_passes():
    npe2 = Path(sys.executable).with_name("npe2")
    out = subprocess.run([str(npe2), "validate", "napari-medsam"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_opening_widget_modules_does_not_import_torch():
    code = ("import sys\n"
            "import napari_medsam._qt.model_widget, napari_medsam._qt.annotation_widget, "
            "napari_medsam._qt.finetune_widget, napari_medsam._reader, napari_medsam._writer, "
            "napari_medsam._sample_data\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---- reader -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.nii", "b.nii.gz", "c.TIF", "d.tiff", "e.npy", "f.zarr", "g.ome.zarr"])
def test_get_reader_claims_supported_files(name):
    assert _reader.get_reader(name) is _reader.read_layers


@pytest.mark.parametrize("name", ["a.png", "b.dcm", "c.gz", "d", "e.txt"])
def test_get_reader_declines_other_files(name):
    assert _reader.get_reader(name) is None
    assert _reader.get_reader([name, "x.nii"]) is None


def test_reader_mni_geometry_and_metadata():
    ref = nib.load(MNI_T1)
    data, kwargs, kind = _reader.read_layers(str(MNI_T1))[0]
    assert kind == "image"
    assert data.shape == ref.shape == (197, 233, 189)
    np.testing.assert_array_equal(np.asarray(data[100]), np.asanyarray(ref.dataobj)[100])
    assert kwargs["scale"] == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(kwargs["translate"], ref.affine[:3, 3])
    np.testing.assert_allclose(kwargs["metadata"]["affine"], ref.affine, atol=1e-6)
    assert kwargs["metadata"]["sform_code"] == 2
    assert isinstance(kwargs["metadata"]["nifti_header"], nib.Nifti1Header)
    assert isinstance(kwargs["metadata"]["napari_medsam"]["volume"], ImageVolume)
    assert kwargs["name"] == "mni_icbm152_t1_tal_nlin_sym_09a_converted"


def test_reader_ct_gets_a_soft_tissue_window(tmp_path):
    path = tmp_path / "ct.nii.gz"
    data = np.full((6, 20, 20), -1000, np.int16)
    data[:, 5:15, 5:15] = 40
    data[:, 8:10, 8:10] = 700
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 3.0, 1.0])), path)
    _, kwargs, _ = _reader.read_layers(path)[0]
    assert kwargs["contrast_limits"] == (-160.0, 240.0)
    assert kwargs["scale"] == (0.5, 0.5, 3.0)


def test_reader_reads_several_files(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 5), np.float32))
    np.save(tmp_path / "b.npy", np.ones((3, 4, 5), np.int16))
    layers = _reader.read_layers([tmp_path / "a.npy", tmp_path / "b.npy"])
    assert [d.shape for d, _, _ in layers] == [(4, 5), (3, 4, 5)]


# ---- writers ------------------------------------------------------------------------------------


def _labels_for(volume: ImageVolume) -> np.ndarray:
    labels = np.zeros(volume.spatial_shape, np.uint16)
    labels[2:5, 10:20, 12:25] = 1
    labels[6, 3:8, 3:9] = 7
    return labels


def test_nifti_writer_copies_the_source_geometry(tmp_path):
    src = tmp_path / "ct.nii.gz"
    _, affine = _oblique_nifti(src)
    _, img_kwargs, _ = _reader.read_layers(src)[0]
    volume = img_kwargs["metadata"]["napari_medsam"]["volume"]
    labels = _labels_for(volume)
    attrs = {"name": "ct labels", "scale": img_kwargs["scale"], "translate": img_kwargs["translate"],
             "metadata": {"napari_medsam": {"reference": volume}}}
    out = _writer.write_labels_nifti(str(tmp_path / "labels.nii.gz"), labels, attrs)
    back = nib.load(out[0])
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    np.testing.assert_allclose(back.header.get_sform(), affine, atol=1e-6)
    np.testing.assert_allclose(back.header.get_qform(), affine, atol=1e-5)
    assert int(back.header["sform_code"]) == 2 and int(back.header["qform_code"]) == 1
    np.testing.assert_allclose(back.header.get_zooms(), (0.7, 0.8, 2.5), atol=1e-6)
    # and it opens again as a Labels layer with the same geometry
    data, kwargs, kind = _reader.read_layers(out[0])[0]
    assert kind == "labels"
    np.testing.assert_array_equal(data, labels)
    np.testing.assert_allclose(kwargs["metadata"]["affine"], affine, atol=1e-6)


@pytest.mark.parametrize("ext", [".ome.zarr", ".zarr", ".tif"])
def test_zarr_and_tiff_writers_round_trip(tmp_path, ext):
    volume = ImageVolume.from_array(np.zeros((9, 33, 34), np.int16), spacing=(2.5, 0.8, 0.7),
                                    origin=(-70.0, 30.25, -12.5))
    labels = _labels_for(volume)
    attrs = {"name": "organs", "metadata": {"napari_medsam": {"reference": volume}}}
    write = _writer.write_labels_tiff if ext == ".tif" else _writer.write_labels_ome_zarr
    out = write(str(tmp_path / f"labels{ext}"), labels, attrs)
    data, kwargs, kind = _reader.read_layers(out[0])[0]
    assert kind == "labels"
    np.testing.assert_array_equal(data, labels)
    np.testing.assert_allclose(kwargs["scale"], volume.spacing, atol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], volume.origin, atol=1e-6)
    if ext != ".tif":
        attrs_json = json.loads((Path(out[0]) / ".zattrs").read_text())
        assert attrs_json["image-label"]["version"] == "0.4"


def test_writer_without_reference_uses_scale_and_translate(tmp_path):
    labels = np.zeros((4, 6, 8), np.uint8)
    labels[1, 2:4, 3:6] = 2
    attrs = {"name": "x", "scale": (3.0, 0.5, 0.25), "translate": (10.0, -5.0, 2.0), "metadata": {}}
    out = _writer.write_labels_nifti(str(tmp_path / "x.nii"), labels, attrs)
    back = nib.load(out[0])
    np.testing.assert_allclose(back.affine, [[3, 0, 0, 10], [0, 0.5, 0, -5], [0, 0, 0.25, 2], [0, 0, 0, 1]],
                               atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)


def test_writer_ignores_a_reference_of_another_shape(tmp_path):
    ref = ImageVolume.from_array(np.zeros((3, 3, 3)), spacing=(9.0, 9.0, 9.0))
    labels = np.ones((4, 6, 8), np.uint8)
    attrs = {"scale": (1.0, 2.0, 3.0), "translate": (0, 0, 0), "metadata": {"napari_medsam": {"reference": ref}}}
    out = _writer.write_labels_nifti(str(tmp_path / "x.nii.gz"), labels, attrs)
    np.testing.assert_allclose(nib.load(out[0]).header.get_zooms(), (1.0, 2.0, 3.0))


# ---- sample data --------------------------------------------------------------------------------


def test_sample_mni_is_the_real_template():
    data, kwargs, kind = _sample_data.make_mni152_sample()[0]
    assert kind == "image" and data.shape == (197, 233, 189) and data.dtype == np.uint8
    np.testing.assert_allclose(kwargs["metadata"]["affine"], nib.load(MNI_T1).affine, atol=1e-6)
    assert _sample_data.mni152_path() == MNI_T1


def test_sample_synthetic_is_small_deterministic_ct():
    a = _sample_data.make_synthetic_sample()[0]
    b = _sample_data.make_synthetic_sample()[0]
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (32, 96, 96) and a[0].dtype == np.int16
    assert a[1]["scale"] == (2.5, 0.8, 0.8)
    assert a[0].min() < -500 and a[0].max() > 500  # air and bone in Hounsfield units


def test_mni_missing_gives_an_actionable_error(monkeypatch):
    from napari_medsam.core.errors import ImageReadError

    monkeypatch.setattr(_sample_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImageReadError, match="pip install nilearn"):
        _sample_data.mni152_path()


def test_labels_layer_data_loads_lazy_volumes(tmp_path):
    np.save(tmp_path / "l.npy", np.arange(24, dtype=np.uint16).reshape(2, 3, 4))
    vol = read_image(tmp_path / "l.npy")
    data, kwargs, kind = _layers.labels_layer_data(vol)
    assert kind == "labels" and isinstance(data, np.ndarray) and data.shape == (2, 3, 4)


@pytest.fixture()
def fresh_napari_settings(monkeypatch):
    """napari settings that are never saved (the user's own stay untouched)."""
    import napari.settings as ns
    from napari.settings._napari_settings import NapariSettings

    settings = NapariSettings(config_path=None)
    monkeypatch.setattr(ns, "_SETTINGS", settings)
    return settings


def test_napari_opens_nifti_without_asking_once_we_are_preferred(fresh_napari_settings):
    """napari's builtin reader also claims *.nii.gz, so napari asks (MultipleReaderError, which the
    File > Open path turns into the reader dialog) until a preference names us; a preference the
    user set stays. ``plugin=None`` is what File > Open and drag-and-drop pass."""
    from napari.components import ViewerModel
    from napari.errors import MultipleReaderError
    from napari.plugins import _initialize_plugins

    _initialize_plugins()
    fresh_napari_settings.plugins.extension2reader = {"*.mha": "napari"}
    viewer = ViewerModel()
    with pytest.raises(MultipleReaderError):
        viewer.open(str(MNI_T1), plugin=None)
    added = _reader.prefer_our_reader()
    assert {"*.nii", "*.nii.gz", "*.nrrd", "*.dcm"} <= set(added)
    assert "*.mha" not in added and "*.tif" not in added and "*/" not in added
    assert fresh_napari_settings.plugins.extension2reader["*.mha"] == "napari"
    layers = viewer.open(str(MNI_T1), plugin=None)
    assert len(layers) == 1 and "affine" in layers[0].metadata
    assert _reader.prefer_our_reader() == {}  # idempotent
    assert set(_reader.prefer_our_reader(directories=True)) == {"*" + os.sep}
