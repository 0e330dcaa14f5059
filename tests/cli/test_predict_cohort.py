"""`napari-medsam predict` over a cohort: globs, lists, DICOM folders, OME-Zarr / DICOM-SEG outputs, workers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medsam.app.cohort import summary_rows
from napari_medsam.cli import main
from napari_medsam.io import read_image
from tests.app.cohort_data import make_cohort, train_head


@pytest.fixture(scope="module")
def setup(mni, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_cohort")
    head = train_head(root / "head", mni["t1"], mni["brain"], mni["affine"])
    volumes = make_cohort(root / "cohort", mni["t1"], mni["affine"], n_nifti=3, n_dicom=2)
    return {"root": root, "head": head, "volumes": volumes}


def test_glob_form_writes_one_output_per_volume_and_resumes(setup, tmp_path, capsys):
    cohort = setup["root"] / "cohort"
    out = tmp_path / "predictions"
    args = ["predict", str(cohort / "*.nii.gz"), "--head", str(setup["head"]), "--no-disk-cache", "-o", str(out)]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 1 and "1 of 4 volume(s) failed" in err and "corrupt.nii.gz" in err and "truncated" in err
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert names == ["nifti_00.nii.gz", "nifti_01.nii.gz", "nifti_02.nii.gz"]
    rows = summary_rows(out / "predict_summary.csv")
    assert sorted(r["status"] for r in rows) == ["done", "done", "done", "failed"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 1 and captured.out.count("already done, skipped") == 3 and "unchanged since" in captured.err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == before  # nothing rewritten
    # --no-resume predicts again, but never replaces outputs without --overwrite
    assert main([*args, "--no-resume"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == before


def test_dicom_folder_and_list_to_ome_zarr_and_dicom_seg(setup, tmp_path, capsys):
    volumes = setup["volumes"]
    dicom = sorted(p for p, v in volumes.items() if v["kind"] == "dicom")
    listing = tmp_path / "cohort.csv"
    listing.write_text("input\n" + "\n".join(dicom) + "\n")
    out = tmp_path / "zarr"
    rc = main(["predict", str(listing), "--head", str(setup["head"]), "--no-disk-cache", "--format", "ome.zarr",
               "--dicom-seg", "--summary", str(tmp_path / "s.csv"), "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    import pydicom

    for src in dicom:
        name = src.rsplit("/", 1)[-1]
        store = out / f"{name}.ome.zarr"
        attrs = json.loads((store / "labels" / "prediction" / ".zattrs").read_text())
        assert attrs["image-label"]["properties"] == [{"label-value": 1, "class": "brain"}]
        image, labels = read_image(store), read_image(store / "labels" / "prediction")
        np.testing.assert_allclose(image.affine, read_image(src).affine, atol=1e-6)
        assert labels.shape == image.shape
        seg = pydicom.dcmread(out / f"{name}.seg.dcm")
        assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 1
        assert int(seg.NumberOfFrames) == int(np.any(np.asarray(labels.data[...]), axis=(1, 2)).sum())
    assert [r["status"] for r in summary_rows(tmp_path / "s.csv")] == ["done", "done"]


def test_one_dicom_series_to_one_file(setup, tmp_path, capsys):
    src = next(p for p, v in setup["volumes"].items() if v["kind"] == "dicom")
    out = tmp_path / "one.nii.gz"
    rc = main(["predict", src, "--head", str(setup["head"]), "--no-disk-cache", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    np.testing.assert_allclose(read_image(out).affine, read_image(src).affine, atol=1e-5)


@pytest.mark.slow
def test_two_worker_processes(setup, tmp_path, capsys):
    """The CLI's LocalCluster (worker processes): outputs, the error row, the dashboard line."""
    out = tmp_path / "out"
    rc = main(["predict", str(setup["root"] / "cohort"), "--head", str(setup["head"]), "--no-disk-cache",
               "--workers", "2", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "1 of 6 volume(s) failed" in err
    assert "dask dashboard: http" in err
    rows = summary_rows(out / "predict_summary.csv")
    assert sorted(r["status"] for r in rows) == ["done"] * 5 + ["failed"]
    assert len(list(out.glob("*.nii.gz"))) == 5
