"""write_labels / write_image: geometry kept per format, dtypes, atomic replacement."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr
from nibabel.testing import data_path

import napari_medsam.io.writers as writers
from napari_medsam.core.errors import InvalidImageError, MedSamError
from napari_medsam.io import ImageVolume, read_image, write_image, write_labels

ANATOMICAL = pathlib.Path(data_path) / "anatomical.nii"  # qform / sform codes 2 / 2, big-endian
MNI = (
    pathlib.Path(importlib.util.find_spec("nilearn").submodule_search_locations[0])
    / "datasets"
    / "data"
    / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
)  # qform / sform codes 0 / 2

SHAPE = (5, 33, 34)
ALL_EXTENSIONS = (".nii", ".nii.gz", ".tif", ".tiff", ".npy", ".zarr", ".ome.zarr")
GEOMETRY_EXTENSIONS = (".nii.gz", ".tif", ".zarr", ".ome.zarr")  # formats that store spacing


def _labels(shape=SHAPE, n: int = 4) -> np.ndarray:
    return (np.random.default_rng(0).integers(0, n, shape)).astype(np.int64)


def _reference(shape=SHAPE) -> ImageVolume:
    affine = np.array(
        [[0.0, 0.0, 0.7, -12.5], [0.0, 0.35, 0.0, 4.25], [2.5, 0.0, 0.0, 30.0], [0.0, 0.0, 0.0, 1.0]]
    )
    return ImageVolume.from_array(
        np.zeros(shape, np.float32), spacing=(2.5, 0.35, 0.7), origin=(30.0, 4.25, -12.5), affine=affine
    )


def _leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- NIfTI geometry ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", [ANATOMICAL, MNI], ids=["anatomical", "mni"])
def test_nifti_labels_keep_reference_geometry(tmp_path, source):
    ref = read_image(source)
    labels = (np.asarray(ref.data[...]) > np.asarray(ref.data[...]).mean()).astype(np.int32) * 2
    out = write_labels(tmp_path / "seg" / "labels.nii.gz", labels, reference=ref)
    assert out == tmp_path / "seg" / "labels.nii.gz"
    back = nib.load(out)
    original = nib.load(source)
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-6)
    for form in ("qform", "sform"):
        matrix, code = getattr(back.header, f"get_{form}")(coded=True)
        orig_matrix, orig_code = getattr(original.header, f"get_{form}")(coded=True)
        assert code == orig_code
        if orig_matrix is not None:
            np.testing.assert_allclose(matrix, orig_matrix, atol=1e-6)
    assert back.header.get_zooms() == original.header.get_zooms()
    assert back.header.get_xyzt_units() == original.header.get_xyzt_units()
    assert back.get_data_dtype() == np.uint8
    assert back.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)


def test_nifti_labels_ignore_reference_scaling(tmp_path):
    values = np.random.default_rng(1).random(SHAPE).astype(np.float32) * 100
    img = nib.Nifti1Image(values, np.diag([0.5, 0.7, 2.5, 1.0]))
    img.set_data_dtype(np.int16)  # stored with scl_slope != 1
    nib.save(img, tmp_path / "scaled.nii")
    ref = read_image(tmp_path / "scaled.nii")
    labels = (values > 50).astype(np.uint8)
    back = nib.load(write_labels(tmp_path / "labels.nii", labels, reference=ref))
    assert back.header.get_slope_inter() == (None, None)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)


def test_nifti2_reference_stays_nifti2(tmp_path):
    affine = np.array([[-1.5, 0, 0, 10], [0, 1.5, 0.2, -4], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti2Image(np.zeros(SHAPE, np.int16), affine), tmp_path / "ref.nii")
    ref = read_image(tmp_path / "ref.nii")
    back = nib.load(write_labels(tmp_path / "labels.nii.gz", _labels(), reference=ref))
    assert isinstance(back, nib.Nifti2Image)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)


def test_nifti_without_reference_is_identity(tmp_path):
    labels = _labels()
    back = nib.load(write_labels(tmp_path / "labels.NII", labels))
    np.testing.assert_allclose(back.affine, np.eye(4))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)


def test_nifti_from_non_nifti_reference_uses_its_affine(tmp_path):
    ref = _reference()
    vol = read_image(write_labels(tmp_path / "labels.nii.gz", _labels(), reference=ref))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)


# ---- round trips through read_image -----------------------------------------------------------


@pytest.mark.parametrize("ext", ALL_EXTENSIONS)
def test_labels_round_trip(tmp_path, ext):
    labels = _labels()
    ref = _reference()
    vol = read_image(write_labels(tmp_path / f"labels{ext}", labels, reference=ref))
    assert vol.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(vol.data[...]), labels)
    np.testing.assert_array_equal(vol.slice(0, 3), labels[3])
    if ext in GEOMETRY_EXTENSIONS:
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
        if ext != ".nii.gz":  # NIfTI spacing comes from the header zooms, origin from the affine
            np.testing.assert_allclose(vol.spacing, ref.spacing, atol=1e-6)
            np.testing.assert_allclose(vol.origin, ref.origin, atol=1e-6)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("ext", ALL_EXTENSIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_image_round_trip(tmp_path, ext, dtype):
    data = (np.random.default_rng(2).random(SHAPE) * 1000).astype(dtype)
    ref = _reference()
    vol = read_image(write_image(tmp_path / f"prob{ext}", data, reference=ref))
    assert vol.dtype == dtype
    np.testing.assert_array_equal(np.asarray(vol.data[...]), data)
    if ext in (".tif", ".zarr"):
        np.testing.assert_allclose(vol.spacing, ref.spacing, atol=1e-6)
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)


def test_2d_labels_round_trip(tmp_path):
    labels = _labels((33, 34))
    ref = ImageVolume.from_array(np.zeros((33, 34, 3), np.uint8), spacing=(0.5, 0.25), origin=(1.0, 2.0))
    assert ref.rgb
    for ext in (".tif", ".zarr", ".nii.gz", ".npy"):
        vol = read_image(write_labels(tmp_path / f"labels2d{ext}", labels, reference=ref))
        np.testing.assert_array_equal(np.asarray(vol.data[...]), labels)
        if ext in (".tif", ".zarr"):
            assert vol.spacing == pytest.approx((0.5, 0.25))
            assert vol.origin == pytest.approx((1.0, 2.0))


# ---- format details ---------------------------------------------------------------------------


def test_ome_zarr_metadata(tmp_path):
    ref = read_image(ANATOMICAL)
    labels = _labels(ref.shape)
    path = write_labels(tmp_path / "labels.ome.zarr", labels, reference=ref, name="tumour")
    assert (path / ".zgroup").is_file()  # zarr format 2
    group = zarr.open_group(str(path), mode="r")
    attrs = group.attrs.asdict()
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4" and ms["name"] == "tumour"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    scale, translation = ms["datasets"][0]["coordinateTransformations"]
    assert scale["scale"] == list(ref.spacing)
    assert translation["translation"] == list(ref.origin)
    assert attrs["image-label"]["version"] == "0.4"
    assert attrs["napari_medsam"]["kind"] == "labels"
    assert [c["label-value"] for c in attrs["image-label"]["colors"]] == [int(v) for v in np.unique(labels) if v]
    levels = [group[d["path"]] for d in ms["datasets"]]
    assert len(levels) > 1  # a pyramid, as NGFF viewers expect
    assert levels[0].chunks == (1, 41, 25)
    np.testing.assert_array_equal(levels[1][...], labels[:, ::2, ::2])  # labels subsample, never blend
    vol = read_image(path)
    assert vol.format == "ome-zarr"
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(vol.data[...]), labels)


def test_image_zarr_has_no_label_metadata(tmp_path):
    path = write_image(tmp_path / "prob.zarr", np.zeros(SHAPE, np.float32))
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    assert "image-label" not in attrs
    assert attrs["napari_medsam"] == {
        "kind": "image",
        "spacing": [1.0, 1.0, 1.0],
        "origin": [0.0, 0.0, 0.0],
        "affine": None,
    }


def test_tiff_is_imagej_compressed_with_spacing(tmp_path):
    path = write_labels(tmp_path / "labels.tif", _labels(), reference=_reference())
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert tif.imagej_metadata["spacing"] == pytest.approx(2.5)
        assert json.loads(tif.imagej_metadata["napari_medsam"])["kind"] == "labels"
        assert tif.series[0].axes == "ZYX"


@pytest.mark.parametrize(
    ("top", "dtype"), [(1, np.uint8), (255, np.uint8), (300, np.uint16), (70_000, np.uint32)]
)
def test_label_dtype_is_smallest_unsigned(tmp_path, top, dtype):
    labels = np.zeros(SHAPE, np.int64)
    labels[2, 10, 10] = top
    vol = read_image(write_labels(tmp_path / "labels.nii.gz", labels))
    assert vol.dtype == dtype
    assert vol.slice(0, 2)[10, 10] == top


def test_boolean_mask_is_written_as_uint8(tmp_path):
    mask = _labels(n=2).astype(bool)
    vol = read_image(write_labels(tmp_path / "mask.npy", mask))
    assert vol.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, mask)


# ---- invalid input ----------------------------------------------------------------------------


def test_shape_mismatch_raises(tmp_path):
    with pytest.raises(InvalidImageError, match="reference"):
        write_labels(tmp_path / "labels.nii.gz", _labels((5, 33, 33)), reference=_reference())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.full(SHAPE, 0.5, np.float32), "integer"),
        (np.full(SHAPE, -1, np.int16), ">= 0"),
        (np.zeros((0, 33, 34), np.uint8), "empty"),
        (np.zeros((2, 5, 33, 34), np.uint8), "3D"),
    ],
)
def test_invalid_labels_raise(tmp_path, labels, match):
    with pytest.raises(InvalidImageError, match=match):
        write_labels(tmp_path / "labels.nii.gz", labels)


def test_unknown_extension_raises(tmp_path):
    with pytest.raises(MedSamError, match="unsupported extension"):
        write_labels(tmp_path / "labels.mha", _labels())


# ---- atomic writes ----------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nii.gz", ".npy", ".tif", ".zarr"])
def test_overwrite_replaces_target_and_leaves_no_temp(tmp_path, ext):
    path = tmp_path / f"labels{ext}"
    write_labels(path, _labels(n=2))
    second = _labels(n=7)
    write_labels(path, second)
    np.testing.assert_array_equal(np.asarray(read_image(path).data[...]), second)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize(("ext", "writer"), [(".npy", "_write_npy"), (".zarr", "_write_ome_zarr")])
def test_failed_write_keeps_old_file_and_cleans_up(tmp_path, monkeypatch, ext, writer):
    path = tmp_path / f"labels{ext}"
    first = _labels(n=2)
    write_labels(path, first)
    original = getattr(writers, writer)

    def crash(tmp, *args, **kwargs):
        original(tmp, *args, **kwargs)  # the temporary is complete ...
        raise OSError("disk full")  # ... but the write still fails

    monkeypatch.setattr(writers, writer, crash)
    with pytest.raises(OSError, match="disk full"):
        write_labels(path, _labels(n=7))
    np.testing.assert_array_equal(np.asarray(read_image(path).data[...]), first)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# ---- output checks before any work ----------------------------------------------------------


def test_check_output_refuses_what_would_destroy_data(tmp_path):
    from napari_medsam.core.errors import OutputError
    from napari_medsam.io.writers import check_output

    src = tmp_path / "scan.nii.gz"
    src.write_bytes(b"scan")
    with pytest.raises(OutputError, match="is the input"):
        check_output(src, inputs=[src])
    link = tmp_path / "alias.nii.gz"
    link.symlink_to(src)
    with pytest.raises(OutputError, match="is the input"):
        check_output(link, inputs=[str(src)], overwrite=True)
    existing = tmp_path / "old.npy"
    existing.write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists — pass --overwrite"):
        check_output(existing)
    assert check_output(existing, overwrite=True) == existing
    existing.chmod(0o444)
    with pytest.raises(OutputError, match="read-only"):
        check_output(existing, overwrite=True)
    (tmp_path / "x.zarr").write_bytes(b"a file, not a store")
    with pytest.raises(OutputError, match="is a file, not a zarr folder"):
        check_output(tmp_path / "x.zarr", overwrite=True)
    (tmp_path / "notastore.zarr").mkdir()
    (tmp_path / "notastore.zarr" / "mine.txt").write_text("user data")
    with pytest.raises(OutputError, match="not a zarr store"):
        check_output(tmp_path / "notastore.zarr", overwrite=True)
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path / "dir.nii.gz", overwrite=True)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(src / "inside.npy")
    with pytest.raises(OutputError, match="too long"):
        check_output(tmp_path / ("a" * 300 + ".npy"))
    with pytest.raises(OutputError, match="unsupported extension"):
        check_output(tmp_path / "labels.png")
    assert check_output(tmp_path / "new" / "deeper" / "labels.nii.gz") == tmp_path / "new" / "deeper" / "labels.nii.gz"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert check_output(tmp_path / "brain.head.pt", kind="file") == tmp_path / "brain.head.pt"


def test_writers_never_replace_a_read_only_file_or_a_zarr_named_file(tmp_path):
    from napari_medsam.core.errors import OutputError

    ro = tmp_path / "ro.npy"
    ro.write_bytes(b"keep me")
    ro.chmod(0o444)
    with pytest.raises(OutputError, match="read-only"):
        write_labels(ro, _labels())
    assert ro.read_bytes() == b"keep me"
    named = tmp_path / "x.zarr"
    named.write_bytes(b"keep me too")
    with pytest.raises(OutputError):
        write_labels(named, _labels())
    assert named.read_bytes() == b"keep me too"


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    import subprocess
    import sys
    import time

    from napari_medsam.io.writers import remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    target = tmp_path / "labels.nii.gz"
    stale = tmp_path / f".labels.tmp-{pid}-0badc0de.nii.gz"  # a writer killed mid-write
    mine = tmp_path / f".labels.tmp-{os.getpid()}-12345678.nii.gz"  # a write of this process in progress
    old = tmp_path / ".labels.tmp-abcdef12.nii.gz"  # the old naming, no PID
    other = tmp_path / ".labels.nii.gz.swp"  # not ours
    for p in (stale, mine, old, other):
        p.write_bytes(b"partial")
    hour_ago = time.time() - 2 * 3600
    os.utime(old, (hour_ago, hour_ago))
    removed = set(remove_stale_temps(target))
    assert removed == {stale, old}
    assert mine.exists() and other.exists()
    write_labels(target, _labels())  # a write cleans up too
    assert target.is_file()
