"""The cohort runner: inputs, output names, in-process and 2-worker LocalCluster runs, retries, resuming."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_medsam.app import cohort
from napari_medsam.app.cohort import CohortItem, CohortParams, expand_inputs, plan, run_cohort, summary_rows
from napari_medsam.core.errors import Cancelled, MedSamError
from napari_medsam.core.progress import drain
from napari_medsam.io import read_image
from tests._helpers import drain_steps
from tests.io.dicom_data import mni_crop, write_series

from .cohort_data import make_cohort, train_head


@pytest.fixture(scope="module")
def head(mni, tmp_path_factory):
    return train_head(tmp_path_factory.mktemp("head"), mni["t1"], mni["brain"], mni["affine"])


@pytest.fixture
def count_loads(monkeypatch):
    """Count model loads (worker threads of a processes=False cluster share this process)."""
    import napari_medsam.core.build as build

    calls = []
    lock = threading.Lock()
    real = build.load_model

    def counting(*a, **kw):
        with lock:
            calls.append(threading.get_ident())
        return real(*a, **kw)

    monkeypatch.setattr(build, "load_model", counting)
    return calls


def _corners(affine: np.ndarray, shape) -> np.ndarray:
    idx = np.array([(i, j, k, 1) for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = (np.asarray(affine) @ idx.T).T[:, :3]
    return world[np.lexsort(np.round(world, 3).T)]


def _check_geometry(volumes: dict, results) -> None:
    """Every output covers the same world box as its input volume, voxel corners to 1e-4 mm."""
    for r in results:
        if r.status != "done":
            continue
        src = volumes[r.input]
        out = read_image(r.output)
        assert sorted(out.shape) == sorted(src["data"].shape)
        np.testing.assert_allclose(_corners(out.affine, out.shape), _corners(src["affine"], src["data"].shape),
                                   atol=1e-4)
        assert r.voxels and sum(r.voxels.values()) == int(np.count_nonzero(out.data[...]))


# ---- inputs and names ------------------------------------------------------------------------------


def test_inputs_from_files_globs_folders_and_lists(mni, tmp_path):
    data, affine = mni_crop(mni["t1"], mni["affine"], step=10)
    import nibabel as nib

    (tmp_path / "scans").mkdir()
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / "scans" / f"{name}.nii.gz")
    np.save(tmp_path / "scans" / "c.npy", data)
    (tmp_path / "scans" / "notes.md").write_text("not an image")
    both = tmp_path / "scans" / "patient"
    write_series(both, data, affine, prefix="x")
    write_series(both, data[:, :, :5], affine, prefix="y")
    single = tmp_path / "single_series"
    write_series(single, data, affine)
    scans = tmp_path / "scans"
    found = expand_inputs([scans])
    uids = sorted(s.uid for s in __import__("napari_medsam.io.dicom", fromlist=["x"]).list_series(both))
    assert found[:3] == [str(scans / "a.nii.gz"), str(scans / "b.nii.gz"), str(scans / "c.npy")]
    assert sorted(found[3:]) == sorted(f"{both}::{u}" for u in uids)  # two series: two volumes
    assert expand_inputs([str(scans / "*.nii.gz"), single]) == [str(scans / "a.nii.gz"), str(scans / "b.nii.gz"),
                                                               str(single)]
    (tmp_path / "list.csv").write_text("subject,input\ns1,scans/b.nii.gz\ns2,single_series\n")
    (tmp_path / "list.txt").write_text("# cohort\nscans/a.nii.gz\n\nmissing.nii.gz\n")
    assert expand_inputs([tmp_path / "list.csv"]) == [str(tmp_path / "scans/b.nii.gz"), str(tmp_path / "single_series")]
    assert expand_inputs([tmp_path / "list.txt"]) == [str(tmp_path / "scans/a.nii.gz"), str(tmp_path / "missing.nii.gz")]
    with pytest.raises(MedSamError, match="matches no file"):
        expand_inputs([str(tmp_path / "nothing*.nii")])


def test_output_names_and_duplicates(tmp_path):
    items = plan(["/d/a.nii", "/d/b.npy", "/dicom/p1", "/dicom/p2::1.2.840.99.123456"], tmp_path)
    assert [Path(i.output).name for i in items] == ["a.nii.gz", "b.npy", "p1.nii.gz", "p2_123456.nii.gz"]
    assert [Path(i.output).name for i in plan(["/d/a.nii"], tmp_path, fmt=".ome.zarr")] == ["a.ome.zarr"]
    with pytest.raises(MedSamError, match="same output name"):
        plan(["/x/a.nii.gz", "/y/a.nii"], tmp_path)
    with pytest.raises(MedSamError, match="cannot all be written"):
        plan(["/x/a.nii.gz", "/y/b.nii"], tmp_path / "one.nii.gz", single_file=True)


def test_threads_per_worker_fit_the_cores():
    assert cohort.cluster_threads(2, cores=16) == 8
    assert cohort.cluster_threads(3, cores=16) == 5
    assert cohort.cluster_threads(4, cores=2) == 1


# ---- runs ----------------------------------------------------------------------------------------


def test_in_process_run_retries_reports_and_resumes(mni, head, tmp_path, count_loads, monkeypatch):
    volumes = make_cohort(tmp_path / "cohort", mni["t1"], mni["affine"], n_nifti=2, n_dicom=1)
    items = plan(expand_inputs([tmp_path / "cohort"]), tmp_path / "out")
    params = CohortParams(head=str(head), disk_cache=False, dicom_seg=True)
    real = cohort.predict_item
    flaky = {"left": 1}

    def once_flaky(item, *a, **kw):  # the first NIfTI fails once (e.g. a file system hiccup)
        if item.input.endswith("nifti_00.nii.gz") and flaky["left"]:
            flaky["left"] -= 1
            raise OSError("transient")
        return real(item, *a, **kw)

    monkeypatch.setattr(cohort, "predict_item", once_flaky)
    progress, result = drain_steps(run_cohort(items, params, summary=tmp_path / "out" / "summary.csv"))
    assert [p.step for p in progress] == [0, 1, 2, 3, 4] and progress[-1].total == 4
    assert len(count_loads) == 1  # one model for the whole run
    by_input = {r.input: r for r in result.results}
    bad = by_input[str(tmp_path / "cohort" / "corrupt.nii.gz")]
    assert bad.status == "failed" and bad.attempts == 2 and "ImageReadError" in bad.error and "truncated" in bad.error
    assert by_input[str(tmp_path / "cohort" / "nifti_00.nii.gz")].attempts == 2
    assert result.count("done") == 3
    _check_geometry(volumes, result.results)
    dicom_out = Path(by_input[str(tmp_path / "cohort" / "dicom_02")].output)
    assert dicom_out.with_name("dicom_02.seg.dcm").is_file()  # --dicom-seg for DICOM inputs
    rows = summary_rows(tmp_path / "out" / "summary.csv")
    assert [r["status"] for r in rows] == [by_input[r["input"]].status for r in rows]
    (err_row,) = [r for r in rows if r["status"] == "failed"]
    assert "truncated" in err_row["error"] and json.loads(err_row["voxels_per_class"]) == {}
    assert json.loads(next(r for r in rows if r["status"] == "done")["voxels_per_class"])["1"] > 0
    # rerun: nothing is predicted again, the unchanged corrupt input is not retried
    monkeypatch.setattr(cohort, "predict_item", lambda *a, **kw: pytest.fail("nothing should run"))
    again = drain(run_cohort(items, params))
    assert [r.status for r in again.results] == [by_input[i.input].status.replace("done", "skipped")
                                                 for i in items]
    assert "unchanged since the last run" in next(r for r in again.results if r.status == "failed").error
    # a changed output (or head) is predicted again
    Path(by_input[str(tmp_path / "cohort" / "nifti_01.nii.gz")].output).write_bytes(b"")
    monkeypatch.setattr(cohort, "predict_item", real)
    third = drain(run_cohort(items, params))
    assert [r.status for r in third.results].count("done") == 1


def test_cancel_stops_between_volumes(mni, head, tmp_path):
    make_cohort(tmp_path / "c", mni["t1"], mni["affine"], n_nifti=2, n_dicom=0, corrupt=False)
    items = plan(expand_inputs([tmp_path / "c"]), tmp_path / "out")
    stop = threading.Event()
    gen = run_cohort(items, CohortParams(head=str(head), disk_cache=False), cancel=stop,
                     summary=tmp_path / "s.csv")
    next(gen)
    next(gen)  # one volume done
    stop.set()
    with pytest.raises(Cancelled):
        next(gen)
    assert [r["status"] for r in summary_rows(tmp_path / "s.csv")] == ["done", "not run"]


def test_bad_head_fails_before_any_work(tmp_path):
    (tmp_path / "x.head.pt").write_bytes(b"not a head")
    with pytest.raises(MedSamError):
        drain(run_cohort([CohortItem("a.nii", str(tmp_path / "a.nii.gz"))],
                         CohortParams(head=str(tmp_path / "x.head.pt"))))
    with pytest.raises(MedSamError, match="not both"):
        drain(run_cohort([], CohortParams(head=str(tmp_path / "x.head.pt")), workers=2, scheduler="tcp://x:1"))


def test_twenty_volumes_on_a_two_worker_cluster(mni, head, tmp_path, count_loads):
    """The done-when run: 12 NIfTI + 7 DICOM + 1 corrupt -> 19 outputs, one error row, a rerun does nothing."""
    volumes = make_cohort(tmp_path / "cohort", mni["t1"], mni["affine"], n_nifti=12, n_dicom=7)
    assert len(volumes) == 20
    items = plan(expand_inputs([tmp_path / "cohort"]), tmp_path / "out")
    params = CohortParams(head=str(head), cache_dir=str(tmp_path / "cache"))
    summary = tmp_path / "out" / "summary.csv"
    progress, result = drain_steps(run_cohort(items, params, workers=2, processes=False, memory_limit=None,
                                              summary=summary))
    assert progress[-1].step == progress[-1].total == 20
    assert result.dashboard is None or result.dashboard.startswith("http")
    assert 1 <= len(count_loads) <= 2  # once per worker, not per volume
    assert result.count("done") == 19 and result.count("failed") == 1
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".nii.gz"))
    assert len(outputs) == 19
    _check_geometry(volumes, result.results)
    rows = summary_rows(summary)
    errors = [r for r in rows if r["status"] != "done"]
    assert len(rows) == 20 and len(errors) == 1
    assert errors[0]["input"].endswith("corrupt.nii.gz") and "ImageReadError" in errors[0]["error"]
    # embeddings stayed in the cache: a volume of the cohort opens already embedded
    from napari_medsam.core.build import load_model
    from napari_medsam.core.embeddings import EmbeddingCache
    from napari_medsam.core.finetune import load_head
    from napari_medsam.core.infer import encoder_for_head

    loaded = load_model("test_tiny_lite", device="cpu")
    dicom = next(r.input for r in result.results if "dicom_" in r.input)
    enc = encoder_for_head(loaded, read_image(dicom), load_head(head, loaded=loaded),
                           cache=EmbeddingCache(tmp_path / "cache" / "embeddings"))
    assert len(enc.cached_indices()) > 0
    # the rerun does nothing: no cluster, no model, same summary
    count_loads.clear()
    again = drain(run_cohort(items, params, workers=2, processes=False, memory_limit=None))
    assert again.dashboard is None and not count_loads
    assert again.count("skipped") == 19 and again.count("failed") == 1
