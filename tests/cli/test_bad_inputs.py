"""The CLI's contract on bad input (issue 17): one error line on stderr, never a traceback, never data lost.

Every row of the issue's table is here. Rows that fail before a model is loaded (bad arguments, bad
files, bad outputs) run as real subprocesses; rows that need the tiny model to get that far run
through ``main()`` in this process (a subprocess costs ~10 s of model start-up each under load),
with the same assertions. ``benchmarks/probe_bad_inputs.py`` prints the whole table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr

from napari_medsam.cli import main
from tests.io.test_formats import _lying_nifti_gz

TINY = ["--model", "test_tiny_lite", "--device", "cpu"]
SHAPE = (6, 32, 32)


def _blob(shape=SHAPE):
    z, r, c = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((r - 16) ** 2 + (c - 15) ** 2) < 64 + 0 * z


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """The bad files of the issue, small."""
    return make_bad_files(tmp_path_factory.mktemp("bad_inputs"))


def make_bad_files(root: Path) -> dict:
    """Write the issue's bad files into ``root``; ``{name: path}`` (also used by benchmarks/probe_bad_inputs.py)."""
    rng = np.random.default_rng(0)
    vol = rng.normal(300, 40, SHAPE).astype(np.float32)
    vol[_blob()] += 400
    f = {"root": root}
    f["vol"] = root / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.9, 0.9, 2.0, 1])), f["vol"])
    f["labels"] = root / "labels.npy"
    np.save(f["labels"], _blob().astype(np.uint8))
    f["neg_labels"] = root / "neg_labels.npy"
    np.save(f["neg_labels"], np.where(_blob(), 1, -1).astype(np.int16))
    f["binary"] = root / "binary.nii.gz"  # two-valued 0/100 int16
    nib.save(nib.Nifti1Image((_blob() * 100).astype(np.int16), np.eye(4)), f["binary"])
    f["constant"] = root / "constant.npy"
    np.save(f["constant"], np.full(SHAPE, 7, np.int16))
    f["nan"] = root / "nan.npy"
    np.save(f["nan"], np.full(SHAPE, np.nan, np.float32))
    f["long"] = root / "vol_1x1x4000.nii.gz"
    nib.save(nib.Nifti1Image(rng.integers(0, 500, (1, 1, 4000)).astype(np.int16), np.eye(4)), f["long"])
    f["text_head"] = root / "notes.head"
    f["text_head"].write_text("not a head file\n")
    f["lying"] = _lying_nifti_gz(root / "lying.nii.gz")
    huge = root / "huge.zarr"
    zarr.create_array(str(huge), shape=(100000,) * 3, chunks=(1, 1000, 1000), dtype=np.int16)
    f["huge"] = huge
    corrupt = root / "corrupt.zarr"
    arr = zarr.create_array(str(corrupt), shape=SHAPE, chunks=(1, 32, 32), dtype=np.float32)
    arr[...] = vol
    (corrupt / "c" / "2" / "0" / "0").write_bytes(b"garbage" * 9)
    f["corrupt"] = corrupt
    holes = root / "holes.zarr"
    arr = zarr.create_array(str(holes), shape=SHAPE, chunks=(1, 32, 32), dtype=np.float32)
    arr[...] = vol
    (holes / "c" / "3" / "0" / "0").unlink()
    f["holes"] = holes
    f["readonly"] = root / "readonly.npy"
    f["readonly"].write_bytes(b"a user's file")
    f["readonly"].chmod(0o444)
    f["zarr_file"] = root / "x.zarr"
    f["zarr_file"].write_bytes(b"a file named like a store")
    f["folder"] = root / "existing.npy"
    f["folder"].mkdir()
    head = root / "tiny.head.pt"
    assert main(["train", str(f["vol"]), str(f["labels"]), "--head", "linear", "--epochs", "2", *TINY,
                 "--cache-dir", str(root / "cache"), "-o", str(head)]) == 0
    f["head"] = head
    payload = torch.load(head, weights_only=True)
    import json

    meta = json.loads(payload["meta"])
    meta["axis"] = 7
    payload["meta"] = json.dumps(meta)
    f["axis7_head"] = root / "axis7.head.pt"
    torch.save(payload, f["axis7_head"])
    return f


def _sub(bad, argv, **env):
    argv = [str(a).format(**bad) for a in argv]
    code = "import sys; from napari_medsam.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=bad["root"])


def assert_one_line_error(rc: int, err: str, needle: str) -> str:
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("napari-medsam ") and needle in line, line
    return line


# (row of the issue, argv, a phrase the one error line must hold); {name} is a file of the fixture
SUBPROCESS_ROWS = [
    ("--axis 5 on a 3D volume", ["segment", "{vol}", "--box", "2,4,4,20,20", "--axis", "5", "-o", "o.nii.gz"],
     "axes 0, 1 and 2"),
    ("--axis 3 (embed)", ["embed", "{vol}", "--axis", "3"], "axes 0, 1 and 2"),
    ("--axis 3 (train)", ["train", "{vol}", "{labels}", "--head", "cnn", "--axis", "3", "-o", "h.pt"],
     "axes 0, 1 and 2"),
    ("--box inf", ["segment", "{vol}", "--box", "inf,16,16,48,48", "-o", "o.nii.gz"], "finite"),
    ("--box R1 inf", ["segment", "{vol}", "--box", "20,16,16,inf,48", "-o", "o.nii.gz"], "finite"),
    ("--box 2.7 as slice", ["segment", "{vol}", "--box", "2.7,4,4,20,20", "-o", "o.nii.gz"], "whole number"),
    ("--window 400,abc", ["segment", "{vol}", "--box", "2,4,4,20,20", "--window", "400,abc", "-o", "o.nii.gz"],
     "WIDTH,LEVEL"),
    ("--window 1,2,3", ["segment", "{vol}", "--box", "2,4,4,20,20", "--window", "1,2,3", "-o", "o.nii.gz"],
     "WIDTH,LEVEL"),
    ("--window nan,40", ["segment", "{vol}", "--box", "2,4,4,20,20", "--window", "nan,40", "-o", "o.nii.gz"],
     "finite"),
    ("embed --slices abc", ["embed", "{vol}", "--slices", "abc"], "slice number"),
    ("train --lr nan", ["train", "{vol}", "{labels}", "--head", "cnn", "--lr", "nan", "-o", "h.pt"], "> 0"),
    ("train --lr -1", ["train", "{vol}", "{labels}", "--head", "cnn", "--lr", "-1", "-o", "h.pt"], "> 0"),
    ("predict --head text file", ["predict", "{vol}", "--head", "{text_head}", "-o", "p.nii.gz"], "head file"),
    ("zarr declaring 100000^3", ["segment", "{huge}", "--box", "2,4,4,20,20", "-o", "o.nii.gz"], "one slice"),
    (".nii.gz header declaring 1000^3", ["embed", "{lying}"], "holds at most"),
    ("segment -o the input", ["segment", "{vol}", "--box", "2,4,4,20,20", "-o", "{vol}"], "is the input"),
    ("predict -o the input", ["predict", "{vol}", "--head", "{head}", "-o", "{vol}"], "is the input"),
    ("train -o the image", ["train", "{vol}", "{labels}", "--head", "cnn", "-o", "{vol}"], "is the input"),
    ("train: image as its own labels", ["train", "{vol}", "{vol}", "--head", "cnn", "-o", "h2.pt"], "image itself"),
    ("read-only output, even with --overwrite",
     ["segment", "{vol}", "--box", "2,4,4,20,20", "-o", "{readonly}", "--overwrite"], "read-only"),
    ("a file named x.zarr", ["segment", "{vol}", "--box", "2,4,4,20,20", "-o", "{zarr_file}", "--overwrite"],
     "not replaced by a store"),
    ("output is an existing folder", ["segment", "{vol}", "--box", "2,4,4,20,20", "-o", "{folder}"], "is a folder"),
    ("parent is a file", ["segment", "{vol}", "--box", "2,4,4,20,20", "-o", "{labels}/o.nii.gz"],
     "not a folder"),
    ("300-character name", ["segment", "{vol}", "--box", "2,4,4,20,20", "-o", "a" * 300 + ".nii.gz"], "too long"),
    ("a system folder", ["segment", "{vol}", "--box", "2,4,4,20,20", "-o", "/proc/labels.nii.gz"],
     "cannot write into"),
    ("train -o into a system folder", ["train", "{vol}", "{labels}", "--head", "cnn", "-o", "/proc/x.head.pt"],
     "cannot write into"),
    ("existing output without --overwrite", ["train", "{vol}", "{labels}", "--head", "cnn", "-o", "{head}"],
     "--overwrite"),
]


@pytest.mark.parametrize("row,argv,needle", SUBPROCESS_ROWS, ids=[r[0] for r in SUBPROCESS_ROWS])
def test_bad_input_is_one_line_in_a_subprocess(bad, row, argv, needle):
    before = {p: p.read_bytes() for p in (bad["vol"], bad["readonly"], bad["zarr_file"], bad["head"])}
    proc = _sub(bad, argv)
    assert_one_line_error(proc.returncode, proc.stderr, needle)
    for p, content in before.items():  # nothing the user had is touched
        assert p.read_bytes() == content, p


def test_debug_shows_the_traceback(bad):
    proc = _sub(bad, ["embed", "{lying}", "--debug"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ImageReadError" in proc.stderr


# ---- rows that get as far as the model (in-process, same contract) ----------------------------


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_elongated_1x1x4000_volume_segments_and_embeds(bad, tmp_path, capsys):
    rc, out, err = _run(capsys, ["segment", bad["long"], "--box", "0,0,0,1,100", *TINY, "-o", tmp_path / "l.nii.gz",
                                 "--cache-dir", tmp_path / "c", "--no-zoom"])  # zoomed, only the box's window is embedded
    assert rc == 0, err
    assert nib.load(tmp_path / "l.nii.gz").shape == (1, 1, 4000)
    rc, out, err = _run(capsys, ["embed", bad["long"], *TINY, "--cache-dir", tmp_path / "c"])
    assert rc == 0 and "cache hits 1" in out, err


def test_head_with_axis_7_is_one_line(bad, tmp_path, capsys):
    rc, out, err = _run(capsys, ["predict", bad["vol"], "--head", bad["axis7_head"], "-o", tmp_path / "p.nii.gz",
                                 "--device", "cpu", "--cache-dir", tmp_path / "c"])
    assert_one_line_error(rc, err, "failed")  # predict runs a cohort: each volume's failure is a line of its own
    assert "slice axis 7 does not exist" in out + err


def test_corrupt_zarr_chunk_mid_run_is_one_line(bad, tmp_path, capsys):
    rc, _, err = _run(capsys, ["embed", bad["corrupt"], *TINY, "--cache-dir", tmp_path / "c"])
    assert_one_line_error(rc, err, "corrupt.zarr")


def test_negative_labels_are_refused(bad, tmp_path, capsys):
    rc, _, err = _run(capsys, ["train", bad["vol"], bad["neg_labels"], "--head", "linear", *TINY,
                               "--cache-dir", tmp_path / "c", "-o", tmp_path / "h.pt"])
    assert_one_line_error(rc, err, "labels must be >= 0")
    assert not (tmp_path / "h.pt").exists()


def test_box_partly_outside_is_clipped(bad, tmp_path, capsys):
    def pixels(box):
        out = tmp_path / f"b{abs(hash(box))}.npy"
        rc, _, err = _run(capsys, ["segment", bad["vol"], "--box", box, *TINY, "-o", out,
                                   "--cache-dir", tmp_path / "c"])
        assert rc == 0, err
        return np.load(out)

    outside, clipped = pixels("2,-10,-10,30,30"), pixels("2,0,0,30,30")
    np.testing.assert_array_equal(outside, clipped)
    assert clipped.sum() > 0


def test_two_valued_image_keeps_its_contrast_under_auto(bad, tmp_path, capsys):
    masks = {}
    for mode in ("auto", "minmax"):
        out = tmp_path / f"{mode}.nii.gz"
        rc, _, err = _run(capsys, ["segment", bad["binary"], "--box", "2,6,5,26,26", "--intensity", mode, *TINY,
                                   "-o", out, "--cache-dir", tmp_path / "c"])
        assert rc == 0, err
        masks[mode] = np.asarray(nib.load(out).dataobj)
    np.testing.assert_array_equal(masks["auto"], masks["minmax"])


@pytest.mark.parametrize("name", ["constant", "nan", "holes"])
def test_degenerate_images_are_warned_about(bad, tmp_path, capsys, caplog, name):
    with caplog.at_level("WARNING"):
        rc, _, err = _run(capsys, ["segment", bad[name], "--box", "2,4,4,20,20", *TINY, "-o", tmp_path / "o.npy",
                                   "--cache-dir", tmp_path / "c"])
    assert rc == 0, err
    text = caplog.text
    assert ("nothing to segment" in text) if name != "holes" else ("1 of 6 chunks are not stored" in text)


def test_unexpected_exception_is_one_line_with_a_debug_hint(bad, tmp_path, capsys, monkeypatch):
    import napari_medsam.io as io

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(io, "read_image", broken)
    rc, _, err = _run(capsys, ["embed", bad["vol"], *TINY])
    line = assert_one_line_error(rc, err, "unexpected ZeroDivisionError: a bug")
    assert "--debug" in line
    with pytest.raises(ZeroDivisionError):
        main(["embed", str(bad["vol"]), *TINY, "--debug"])


def test_overwrite_replaces_an_existing_output(bad, tmp_path, capsys):
    out = tmp_path / "o.npy"
    argv = ["segment", bad["vol"], "--box", "2,4,4,20,20", *TINY, "-o", out, "--cache-dir", tmp_path / "c"]
    assert _run(capsys, argv)[0] == 0
    rc, _, err = _run(capsys, argv)
    assert_one_line_error(rc, err, "--overwrite")
    assert _run(capsys, [*argv, "--overwrite"])[0] == 0


def test_no_input_is_replaced_in_the_fixture(bad):
    assert Path(bad["readonly"]).read_bytes() == b"a user's file"
    assert Path(bad["zarr_file"]).read_bytes() == b"a file named like a store"
