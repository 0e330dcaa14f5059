"""Volumetric formats beyond NIfTI (nibabel's others, NRRD, MetaImage) and declared-size refusals."""

from __future__ import annotations

import gzip
import importlib.util
import pathlib
import resource
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import zarr

from napari_medsam.core.errors import ImageReadError, InvalidImageError
from napari_medsam.io import image_format, read_image
from napari_medsam.io import readers as readers_mod
from tests.conftest import MNI_T1

NIBABEL_DATA = pathlib.Path(importlib.util.find_spec("nibabel").submodule_search_locations[0]) / "tests" / "data"


@pytest.fixture(scope="module")
def crop():
    """A small crop of the MNI152 T1 with an oblique, anisotropic affine (RAS+)."""
    t1 = nib.load(MNI_T1)
    data = np.asanyarray(t1.dataobj)[60:90, 80:112, 70:95].astype(np.int16)
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = (-30.0, 12.5, 7.0)
    return data, affine


def _lps(affine):
    out = affine.copy()
    out[:2, :] *= -1
    return out


def _write_nrrd(path, data, affine, encoding):
    import nrrd

    lps = _lps(affine)
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,
                                 "space origin": lps[:3, 3], "encoding": encoding})


def _write_metaimage(path, data, affine, compress):
    import SimpleITK as sitk

    lps = _lps(affine)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.T))  # numpy (k, j, i) for ITK's (i, j, k)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    sitk.WriteImage(img, str(path), useCompression=compress)


WRITERS = {
    "scan.mgz": lambda p, d, a: nib.save(nib.MGHImage(d.astype(np.float32), a), p),
    "scan.mgh": lambda p, d, a: nib.save(nib.MGHImage(d.astype(np.float32), a), p),
    "pair.img": lambda p, d, a: nib.save(nib.Nifti1Pair(d, a), p),
    "scan.nrrd": lambda p, d, a: _write_nrrd(p, d, a, "gzip"),
    "raw.nrrd": lambda p, d, a: _write_nrrd(p, d, a, "raw"),
    "scan.mha": lambda p, d, a: _write_metaimage(p, d, a, True),
    "scan.mhd": lambda p, d, a: _write_metaimage(p, d, a, False),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_format_reads_voxels_and_geometry(tmp_path, crop, name):
    data, affine = crop
    path = tmp_path / name
    WRITERS[name](path, data, affine)
    vol = read_image(path)
    assert vol.shape == data.shape
    np.testing.assert_array_equal(np.asarray(vol.data[...]), data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, (0.8, 1.2, 2.5), atol=1e-5)
    assert vol.slice(2, 4).shape == (30, 32)


def test_analyze_pair_reads_with_its_own_geometry(tmp_path, crop):
    data, affine = crop
    nib.save(nib.AnalyzeImage(data, affine), tmp_path / "old.hdr")
    for name in ("old.hdr", "old.img"):
        vol = read_image(tmp_path / name)
        np.testing.assert_array_equal(np.asarray(vol.data[...]), data)
        # Analyze 7.5 keeps zooms and an origin only: the affine is nibabel's reading of them
        np.testing.assert_allclose(vol.affine, nib.load(tmp_path / "old.hdr").affine)
        np.testing.assert_allclose(vol.spacing, (0.8, 1.2, 2.5), atol=1e-5)


@pytest.mark.parametrize("name,shape", [
    ("minc1_1_scale.mnc", (10, 20, 20)),
    ("minc2_1_scale.mnc", (10, 20, 20)),  # MINC 2 is HDF5 (h5py)
    ("tinypet.v", (10, 10, 3)),  # ECAT 7 with one frame
])
def test_nibabel_sample_files(name, shape):
    path = NIBABEL_DATA / name
    vol = read_image(path)
    assert vol.shape == shape
    img = nib.ecat.load(path) if name.endswith(".v") else nib.load(path)
    np.testing.assert_allclose(np.asarray(vol.data[...]), np.asanyarray(img.dataobj).reshape(shape))
    np.testing.assert_allclose(vol.affine, img.affine)


@pytest.mark.parametrize("name", ["phantom_EPI_asc_CLEAR_2_1.PAR", "minc1_4d.mnc"])
def test_4d_files_are_refused_with_what_to_do(name):
    with pytest.raises(InvalidImageError, match="4D .* only 2D and 3D images.*Save one volume"):
        read_image(NIBABEL_DATA / name)


def test_new_extensions_are_known_and_read_only():
    from napari_medsam.core.errors import OutputError
    from napari_medsam.io.writers import check_output

    for name in ("a.mgz", "a.MNC", "a.nrrd", "a.nhdr", "a.mha", "a.mhd", "a.PAR", "a.rec", "a.hdr", "a.v"):
        assert image_format(name) is not None, name
    with pytest.raises(OutputError, match="unsupported extension '.mgz' for an output"):
        check_output("labels.mgz")


def test_napari_manifest_lists_the_readers_patterns():
    import yaml

    manifest = yaml.safe_load((pathlib.Path(readers_mod.__file__).parents[1] / "napari.yaml").read_text())
    patterns = set(manifest["contributions"]["readers"][0]["filename_patterns"])
    for ext in readers_mod.SUPPORTED_EXTENSIONS:
        assert f"*{ext}" in patterns, ext


# ---- declared sizes --------------------------------------------------------------------------


def _lying_nifti_gz(path, shape=(1000, 1000, 1000)):
    """A gzip NIfTI whose header declares ``shape`` int16 but holds 60 KB of voxels."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    body = hdr.binaryblock + b"\0" * 4 + np.random.default_rng(0).integers(0, 9, 30000, dtype=np.int16).tobytes()
    path.write_bytes(gzip.compress(body))
    return path


def test_compressed_header_declaring_more_than_it_can_hold_is_refused(tmp_path):
    path = _lying_nifti_gz(tmp_path / "big.nii.gz")
    with pytest.raises(ImageReadError, match="declares shape \\(1000, 1000, 1000\\).*holds at most"):
        read_image(path)


def test_lying_header_is_refused_before_any_allocation(tmp_path):
    """The issue's 125 KB .nii.gz declaring 1000^3 reached 2.0 GB RSS; now it fails under 0.5 GB."""
    path = _lying_nifti_gz(tmp_path / "big.nii.gz")
    code = ("import resource, sys\nfrom napari_medsam.io import read_image\n"
            f"try:\n    read_image({str(path)!r})\nexcept Exception as e:\n    print(type(e).__name__)\n"
            # VmHWM: this process's own peak (ru_maxrss also counts the forked parent's pages before exec)
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    name, rss_kb = out.stdout.split()
    assert name == "ImageReadError"
    assert int(rss_kb) < 500 * 1024, rss_kb
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_whole_load_larger_than_free_memory_is_refused(tmp_path, monkeypatch, crop):
    data, affine = crop
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ok.nii.gz")
    monkeypatch.setattr(readers_mod, "_available_memory", lambda: data.nbytes // 2)
    with pytest.raises(ImageReadError, match="more than the .* of free memory"):
        read_image(tmp_path / "ok.nii.gz")
    monkeypatch.setattr(readers_mod, "_available_memory", lambda: 10 * data.nbytes)
    assert read_image(tmp_path / "ok.nii.gz").shape == data.shape


def test_zarr_declaring_a_slice_too_big_for_memory_is_refused(tmp_path):
    path = tmp_path / "huge.zarr"
    zarr.create_array(str(path), shape=(100000, 100000, 100000), chunks=(1, 1000, 1000), dtype=np.int16)
    with pytest.raises(ImageReadError, match="one slice of it is .* more than\\s+half"):
        read_image(path)


def test_corrupt_zarr_chunk_is_a_read_error_naming_the_file(tmp_path):
    path = tmp_path / "scan.zarr"
    arr = zarr.create_array(str(path), shape=(4, 16, 16), chunks=(1, 16, 16), dtype=np.int16)
    arr[...] = np.arange(4 * 16 * 16, dtype=np.int16).reshape(4, 16, 16)
    (path / "c" / "2" / "0" / "0").write_bytes(b"garbage" * 8)
    vol = read_image(path)  # lazy: the damage shows when slice 2 is read
    assert vol.slice(0, 1).shape == (16, 16)
    with pytest.raises(ImageReadError, match="scan.zarr"):
        vol.slice(0, 2)


def test_zarr_missing_chunks_are_logged(tmp_path, caplog):
    path = tmp_path / "holes.zarr"
    arr = zarr.create_array(str(path), shape=(4, 16, 16), chunks=(1, 16, 16), dtype=np.int16)
    arr[...] = 7
    (path / "c" / "1" / "0" / "0").unlink()
    with caplog.at_level("WARNING", logger="napari_medsam.io.readers"):
        read_image(path)
    assert "1 of 4 chunks are not stored" in caplog.text



def test_an_mgh_declaring_more_voxels_than_it_holds_is_a_read_error(tmp_path):
    """nibabel raises ValueError reading a slice of an MGH whose header declares more voxels than the file
    holds (found by tests/test_fuzz.py): one ImageReadError, not a ValueError."""
    import struct

    path = tmp_path / "a.mgh"
    nib.save(nib.MGHImage(np.arange(4 * 10 * 12, dtype=np.float32).reshape(4, 10, 12), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    raw[4:16] = struct.pack(">iii", 200, 200, 200)  # width, height, depth (big-endian int32)
    path.write_bytes(bytes(raw))
    vol = read_image(path)  # the header alone is plausible: opened lazily
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        vol.slice(0, 0)
