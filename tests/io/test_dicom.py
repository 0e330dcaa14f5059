"""DICOM series from MNI slices (written with pydicom): geometry, rescale, several series, SEG export."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.core.errors import ImageReadError, InvalidImageError
from napari_medsam.io import read_image, write_labels
from napari_medsam.io.dicom import is_dicom_path, list_series, read_dicom

from .dicom_data import mni_crop, write_series


@pytest.fixture(scope="module")
def crop(mni):
    return mni_crop(mni["t1"], mni["affine"], step=5)


@pytest.fixture(scope="module")
def series(crop, tmp_path_factory):
    data, affine = crop
    folder = tmp_path_factory.mktemp("dicom") / "two_series"
    write_series(folder, data, affine, slope=0.5, intercept=-20.0, description="T1", prefix="a")
    # a second series in the same folder: half the slices, shifted in space
    write_series(folder, data[:, :, ::2], affine @ np.diag([1, 1, 2, 1.0]), description="half", prefix="b",
                 shuffle_seed=3)
    return folder


def _corners(shape):
    return [np.array([i, j, k]) for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]


def test_two_series_in_one_folder_are_listed_and_chosen(series, crop):
    data, _ = crop
    found = list_series(series)
    assert [s.frames for s in found] == [data.shape[2], len(range(0, data.shape[2], 2))]
    assert [s.description for s in found] == ["T1", "half"]
    with pytest.raises(InvalidImageError, match="2 DICOM series") as err:
        read_image(series)
    assert found[0].uid in str(err.value) and "::0" in str(err.value)
    by_index = read_image(f"{series}::1")
    by_uid = read_dicom(series, series=found[1].uid)
    assert by_index.shape == by_uid.shape == (len(found[1].files), data.shape[1], data.shape[0])
    with pytest.raises(InvalidImageError, match="no DICOM series"):
        read_dicom(series, series="7")


def test_geometry_matches_the_nifti_voxel_for_voxel(series, crop):
    data, affine = crop
    vol = read_image(f"{series}::0")
    assert vol.format == "dicom" and vol.shape == (data.shape[2], data.shape[1], data.shape[0])
    # files are shuffled and InstanceNumber runs backwards: the order comes from the positions
    np.testing.assert_allclose(np.asarray(vol.data[...]), np.transpose(data, (2, 1, 0)), atol=0.25)
    assert vol.dtype == np.float32  # slope 0.5 makes fractional values
    for ijk in _corners(data.shape):
        world_nifti = affine @ [*ijk, 1]
        world_dicom = vol.affine @ [ijk[2], ijk[1], ijk[0], 1]
        np.testing.assert_allclose(world_dicom, world_nifti, atol=1e-4)
    assert vol.spacing == pytest.approx((5.0, 5.0, 5.0))
    np.testing.assert_allclose(vol.origin, affine[:3, 3])


def test_geometry_agrees_with_simpleitk(series):
    import SimpleITK as sitk

    first = list_series(series)[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series), first.uid))
    ref = reader.Execute()
    vol = read_dicom(series, series=0)
    direction = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())  # LPS, index (x, y, z)
    lps = np.diag([-1.0, -1.0, 1.0])
    # SimpleITK's index (x=col, y=row, z=slice) is our (k, r, c) reversed
    np.testing.assert_allclose(lps @ direction[:, ::-1], vol.affine[:3, :3], atol=1e-6)
    np.testing.assert_allclose(lps @ np.array(ref.GetOrigin()), vol.affine[:3, 3], atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(ref), np.asarray(vol.data[...]), atol=1e-3)


def test_slices_are_read_lazily_and_nifti_output_keeps_the_geometry(series, crop, tmp_path):
    data, affine = crop
    vol = read_image(f"{series}::0")
    assert not isinstance(vol.data, np.ndarray)
    np.testing.assert_allclose(vol.slice(0, 3), data[:, :, 3].T, atol=0.25)
    labels = np.zeros(vol.shape, np.uint8)
    labels[2:5, 4:9, 3:7] = 1
    out = read_image(write_labels(tmp_path / "lab.nii.gz", labels, reference=vol))
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-5)
    k, r, c = np.argwhere(labels)[0]
    np.testing.assert_allclose(out.affine @ [k, r, c, 1], affine @ [c, r, k, 1], atol=1e-4)


def test_corrupt_and_empty_folders_raise_clear_errors(series, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert not is_dicom_path(empty)
    with pytest.raises(ImageReadError, match="not found|unsupported"):
        read_image(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    assert is_dicom_path(broken)
    with pytest.raises(ImageReadError, match="No DICOM image"):
        read_image(broken)


def test_uneven_gaps_are_refused(crop, tmp_path):
    data, affine = crop
    write_series(tmp_path / "gap", data, affine)
    files = sorted((tmp_path / "gap").iterdir())
    vol = read_image(tmp_path / "gap")
    # remove one inner slice (the file at sorted position 3)
    import pydicom

    victim = next(f for f in files if float(pydicom.dcmread(f).ImagePositionPatient[2]) == pytest.approx(
        vol.affine[2, 3] + 3 * vol.spacing[0]))
    victim.unlink()
    with pytest.raises(InvalidImageError, match="uneven"):
        read_image(tmp_path / "gap")


def test_multiframe_file(crop, tmp_path):
    import highdicom as hd
    import pydicom

    data, affine = crop
    files = write_series(tmp_path / "single", data, affine, slope=2.0, intercept=-100.0)
    sources = [pydicom.dcmread(f) for f in files]
    legacy = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=sources, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1)
    path = tmp_path / "multi.dcm"
    legacy.save_as(path)
    vol = read_image(path)
    ref = read_image(tmp_path / "single")
    assert vol.shape == ref.shape and vol.dtype == ref.dtype == np.int32  # int16 x 2 - 100 needs int32
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)
    np.testing.assert_array_equal(vol.data[...], ref.data[...])


def test_dicom_seg_reads_back(series, tmp_path):
    import highdicom as hd
    import pydicom

    from napari_medsam.io.dicom_seg import write_dicom_seg

    vol = read_image(f"{series}::0")
    labels = np.zeros(vol.shape, np.uint8)
    labels[1:4, 5:15, 4:12] = 1
    labels[3:7, 16:25, 8:16] = 4
    path = write_dicom_seg(tmp_path / "seg.dcm", labels, reference=vol, class_names=["left", "right"])
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and len(ds.SegmentSequence) == 2
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["left", "right"]
    assert int(ds.NumberOfFrames) == 3 + 4  # one frame per segment per slice holding it
    seg = hd.seg.segread(path)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in vol.meta["dicom_files"]]
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                             skip_overlap_checks=True)
    expect = np.select([labels == 1, labels == 4], [1, 2], 0)
    np.testing.assert_array_equal(back, expect)
    with pytest.raises(InvalidImageError, match="single-frame DICOM series"):
        write_dicom_seg(tmp_path / "x.dcm", labels, reference=read_image(write_labels(tmp_path / "l.nii", labels)))


def test_napari_reader_opens_each_series_as_a_layer(series):
    from napari_medsam import _reader

    reader = _reader.get_reader(str(series))
    assert reader is not None
    layers = reader(str(series))
    assert len(layers) == 2 and all(kind == "image" for _, _, kind in layers)
    data, kwargs, _ = layers[0]
    assert tuple(data.shape) == read_image(f"{series}::0").shape
    np.testing.assert_allclose(kwargs["scale"], (5.0, 5.0, 5.0))
