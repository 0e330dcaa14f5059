"""read_image and ImageVolume on real NIfTI files (nibabel, nilearn) and small synthetic files."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr
from nibabel.testing import data_path

from napari_medsam.core.errors import ImageReadError, InvalidImageError, MedSamError
from napari_medsam.io import SUPPORTED_EXTENSIONS, ImageVolume, LazyArray, image_format, read_image

ANATOMICAL = pathlib.Path(data_path) / "anatomical.nii"  # real 3D brain, big-endian int16, 2 mm
EXAMPLE_4D = pathlib.Path(data_path) / "example4d.nii.gz"  # (128, 96, 24, 2) time series
MNI = (
    pathlib.Path(importlib.util.find_spec("nilearn").submodule_search_locations[0])
    / "datasets"
    / "data"
    / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
)  # (197, 233, 189) uint8, sform code 2, qform code 0

SHAPE = (5, 33, 34)


def _volume(shape=SHAPE, dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(shape)) % 1000).reshape(shape).astype(dtype)


class _RecordingArray:
    """A lazy base array that records every index it is asked for."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.requests: list = []

    def __getitem__(self, key):
        self.requests.append(key)
        return self._array[key]


# ---- NIfTI ------------------------------------------------------------------------------------


def test_nifti_anatomical_lazy_geometry():
    vol = read_image(ANATOMICAL)
    ref = nib.load(ANATOMICAL)
    assert vol.format == "nifti"
    assert isinstance(vol.data, LazyArray)
    assert vol.shape == ref.shape == (33, 41, 25)
    assert vol.dtype == np.int16
    assert vol.spacing == tuple(float(z) for z in ref.header.get_zooms())
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    np.testing.assert_allclose(vol.origin, ref.affine[:3, 3])
    assert (vol.meta["qform_code"], vol.meta["sform_code"]) == (2, 2)
    assert isinstance(vol.meta["nifti_header"], nib.Nifti1Header)
    expected = np.asanyarray(ref.dataobj)
    np.testing.assert_array_equal(vol.slice(2, 7), expected[:, :, 7])
    np.testing.assert_array_equal(vol.slice(0, -1), expected[-1])
    np.testing.assert_array_equal(np.asarray(vol.data), expected)
    assert vol.n_slices(1) == 41


def test_nifti_eager_equals_lazy():
    lazy = read_image(ANATOMICAL)
    eager = read_image(ANATOMICAL, lazy=False)
    assert isinstance(eager.data, np.ndarray)
    np.testing.assert_array_equal(eager.data, lazy.data[...])
    assert eager.spacing == lazy.spacing


def test_nifti_mni_gz_slices_and_codes():
    vol = read_image(MNI)
    ref = nib.load(MNI)
    assert vol.shape == (197, 233, 189)
    assert vol.dtype == np.uint8
    assert (vol.meta["qform_code"], vol.meta["sform_code"]) == (0, 2)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    np.testing.assert_array_equal(vol.slice(2, 100), np.asanyarray(ref.dataobj[:, :, 100]))


def test_nifti_4d_series_raises_with_hint():
    with pytest.raises(InvalidImageError, match=r"slicer\[\.\.\., 0\]"):
        read_image(EXAMPLE_4D)


def test_nifti_singleton_4th_axis_is_squeezed_lazily(tmp_path):
    data = _volume()[..., None]
    path = tmp_path / "one_volume.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.7, 2.5, 1.0])), path)
    vol = read_image(path)
    assert vol.shape == SHAPE
    assert vol.spacing == pytest.approx((0.5, 0.7, 2.5))
    np.testing.assert_array_equal(vol.slice(0, 3), data[3, ..., 0])
    np.testing.assert_array_equal(vol.slice(2, 33), data[:, :, 33, 0])


def test_nifti_scaling_gives_floats(tmp_path):
    values = np.random.default_rng(0).random(SHAPE).astype(np.float32) * 100
    img = nib.Nifti1Image(values, np.eye(4))
    img.set_data_dtype(np.int16)  # nibabel stores scl_slope / scl_inter
    path = tmp_path / "scaled.nii"
    nib.save(img, path)
    vol = read_image(path)
    assert vol.dtype.kind == "f"
    assert vol.slice(0, 2).dtype == vol.dtype
    np.testing.assert_allclose(vol.data[...], values, atol=0.01)


def test_nifti2_reads(tmp_path):
    path = tmp_path / "n2.nii"
    nib.save(nib.Nifti2Image(_volume(), np.diag([1.5, 1.5, 3.0, 1.0])), path)
    vol = read_image(path)
    assert vol.meta["nifti_version"] == 2
    assert vol.spacing == (1.5, 1.5, 3.0)
    np.testing.assert_array_equal(vol.data[...], _volume())


def test_corrupt_nifti_gz_names_file_and_format(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match=r"broken\.nii\.gz as NIfTI") as info:
        read_image(path)
    assert info.value.__cause__ is not None


def test_truncated_nifti_gz_fails_on_open(tmp_path):
    path = tmp_path / "truncated.nii.gz"
    raw = MNI.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    # gzip cannot seek, so compressed NIfTI is decompressed when opened: the error comes at once
    with pytest.raises(ImageReadError, match=r"truncated\.nii\.gz as NIfTI"):
        read_image(path)
    with pytest.raises(ImageReadError, match="truncated.nii.gz"):
        read_image(path, lazy=False)


def test_truncated_uncompressed_nifti_fails_on_open(tmp_path):
    path = tmp_path / "truncated.nii"
    path.write_bytes(ANATOMICAL.read_bytes()[:-100])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)


# ---- TIFF -------------------------------------------------------------------------------------


def test_tiff_imagej_spacing_and_memmap(tmp_path):
    data = _volume(dtype=np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path, data, imagej=True, resolution=(1 / 0.5, 1 / 0.25), metadata={"spacing": 3.0, "axes": "ZYX"}
    )
    vol = read_image(path)
    assert vol.format == "tiff"
    assert isinstance(vol.data, np.memmap)
    assert vol.spacing == pytest.approx((3.0, 0.25, 0.5))
    assert vol.affine is None
    np.testing.assert_array_equal(vol.slice(0, 4), data[4])


def test_tiff_compressed_falls_back_to_reading(tmp_path):
    data = _volume(dtype=np.float32)
    path = tmp_path / "stack.TIFF"
    tifffile.imwrite(path, data, compression="zlib")
    vol = read_image(path)
    assert vol.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(vol.data[...], data)


def test_tiff_rgb(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (33, 34, 3), dtype=np.uint8)
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    vol = read_image(path)
    assert vol.rgb
    assert vol.spatial_shape == (33, 34)
    assert len(vol.spacing) == 2
    assert vol.n_slices(0) == 1
    np.testing.assert_array_equal(vol.slice(0, 0), rgb)


def test_tiff_multichannel_raises(tmp_path):
    path = tmp_path / "channels.tif"
    tifffile.imwrite(path, np.zeros((5, 2, 33, 34), np.uint16), imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(InvalidImageError, match="2 channels"):
        read_image(path)


def test_corrupt_tiff(tmp_path):
    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 50)
    with pytest.raises(ImageReadError, match="as TIFF"):
        read_image(path)


# ---- .npy and zarr ----------------------------------------------------------------------------


def test_npy_lazy_and_eager(tmp_path):
    data = _volume()
    path = tmp_path / "vol.npy"
    np.save(path, data)
    lazy = read_image(path)
    assert isinstance(lazy.data, np.memmap)
    assert lazy.format == "npy"
    np.testing.assert_array_equal(lazy.slice(1, 32), data[:, 32])
    eager = read_image(path, lazy=False)
    assert type(eager.data) is np.ndarray
    np.testing.assert_array_equal(eager.data, data)


def test_plain_zarr_array(tmp_path):
    data = _volume(dtype=np.float32)
    path = tmp_path / "plain.zarr"
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, 33, 34))
    arr[...] = data
    vol = read_image(path)
    assert vol.format == "zarr"
    assert isinstance(vol.data, LazyArray)  # lazy, and a corrupt chunk read later names the file
    assert vol.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(vol.slice(0, 2), data[2])


def test_ome_zarr_v05_with_channel_axis(tmp_path):
    data = _volume(dtype=np.uint16)[None]  # (c=1, z, y, x)
    path = tmp_path / "image.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    level = group.create_array("s0", shape=data.shape, dtype=data.dtype, chunks=(1, 1, 33, 34))
    level[...] = data
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "z", "type": "space", "unit": "millimeter"},
                    {"name": "y", "type": "space", "unit": "millimeter"},
                    {"name": "x", "type": "space", "unit": "millimeter"},
                ],
                "datasets": [
                    {
                        "path": "s0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0, 2.5, 0.5, 0.25]},
                            {"type": "translation", "translation": [0.0, 10.0, -5.0, 1.0]},
                        ],
                    }
                ],
                "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0, 1.0, 1.0]}],
            }
        ],
    }
    vol = read_image(path)
    assert vol.format == "ome-zarr"
    assert vol.shape == SHAPE
    assert vol.spacing == pytest.approx((5.0, 0.5, 0.25))
    assert vol.origin == pytest.approx((20.0, -5.0, 1.0))
    np.testing.assert_array_equal(vol.slice(0, 3), data[0, 3])
    assert vol.meta["ngff_version"] == "0.5"


def test_ome_zarr_multichannel_raises(tmp_path):
    path = tmp_path / "rgb.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=(3, 33, 34), dtype=np.uint8)
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space"},
                {"name": "x", "type": "space"},
            ],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}],
        }
    ]
    with pytest.raises(InvalidImageError, match="channel axis"):
        read_image(path)


def test_corrupt_zarr(tmp_path):
    path = tmp_path / "broken.zarr"
    path.mkdir()
    (path / ".zgroup").write_text("not json")
    with pytest.raises(ImageReadError, match="as zarr"):
        read_image(path)


# ---- errors common to all formats -------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("name", ["scan.png", "scan.xyz", "noextension"])
def test_unknown_extension_lists_supported(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"data")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert all(ext in str(info.value) for ext in SUPPORTED_EXTENSIONS)


def test_empty_array_raises(tmp_path):
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((0, 33, 34), np.float32))
    with pytest.raises(InvalidImageError, match="empty"):
        read_image(path)


@pytest.mark.parametrize("shape", [(34,), (2, 5, 33, 34), (1, 2, 3, 4, 5)])
def test_bad_dimensionality_raises(tmp_path, shape):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, np.float32))
    with pytest.raises(InvalidImageError):
        read_image(path)


def test_errors_are_medsam_errors():
    assert issubclass(ImageReadError, MedSamError)
    assert issubclass(InvalidImageError, MedSamError)


# ---- ImageVolume and LazyArray ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.NII.GZ", "nifti"),
        ("a.nii", "nifti"),
        ("a.Tif", "tiff"),
        ("a.ome.zarr", "zarr"),
        ("a.zarr/0", "zarr"),
        ("a.gz", None),
    ],
)
def test_image_format(name, fmt):
    assert image_format(name) == fmt


def test_from_array_guesses_rgb_and_validates():
    rgb = ImageVolume.from_array(np.zeros((33, 34, 3), np.uint8))
    assert rgb.rgb and rgb.spatial_shape == (33, 34) and rgb.spacing == (1.0, 1.0)
    gray = ImageVolume.from_array(np.zeros((5, 33, 3), np.int16), spacing=(2, 1, 0.5), origin=(1, 2, 3))
    assert not gray.rgb and gray.spacing == (2.0, 1.0, 0.5) and gray.origin == (1.0, 2.0, 3.0)
    assert gray.format == "array"
    with pytest.raises(InvalidImageError, match="spacing"):
        ImageVolume.from_array(np.zeros(SHAPE), spacing=(1.0, 1.0))
    with pytest.raises(InvalidImageError, match="positive"):
        ImageVolume.from_array(np.zeros(SHAPE), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InvalidImageError, match="4x4"):
        ImageVolume.from_array(np.zeros(SHAPE), affine=np.eye(3))
    with pytest.raises(InvalidImageError, match="dtype"):
        ImageVolume.from_array(np.zeros(SHAPE, np.complex64))


def test_slice_bounds_and_2d():
    data = _volume(dtype=np.float32)
    vol = ImageVolume.from_array(data)
    with pytest.raises(IndexError):
        vol.slice(0, 5)
    with pytest.raises(IndexError):
        vol.slice(3, 0)
    flat = ImageVolume.from_array(data[0])
    assert flat.n_slices(0) == flat.n_slices(1) == 1
    np.testing.assert_array_equal(flat.slice(1, 0), data[0])


def test_lazy_array_reads_only_requested_slice():
    base = _RecordingArray(_volume()[:, None, :, :, None])  # (5, 1, 33, 34, 1)
    lazy = LazyArray(base, drop_axes=(1, 4), source="x", format="test")
    assert lazy.shape == SHAPE and lazy.ndim == 3
    vol = ImageVolume(data=lazy, spacing=None, origin=None, affine=None)
    np.testing.assert_array_equal(vol.slice(0, 2), _volume()[2])
    assert base.requests == [(2, 0, slice(None), slice(None), 0)]
    np.testing.assert_array_equal(lazy[..., 3], _volume()[..., 3])
    assert base.requests[-1] == (slice(None), 0, slice(None), 3, 0)
    with pytest.raises(IndexError):
        lazy[0, 0, 0, 0]


def test_volume_is_frozen_and_compares_by_identity():
    vol = ImageVolume.from_array(np.zeros((33, 34)))
    with pytest.raises(AttributeError):
        vol.spacing = (2.0, 2.0)  # type: ignore[misc]
    assert vol != ImageVolume.from_array(np.zeros((33, 34)))
    assert vol == vol


def test_reads_accept_str_paths():
    assert read_image(os.fspath(ANATOMICAL)).shape == (33, 41, 25)
