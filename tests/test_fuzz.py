"""Bounded fuzzing (hypothesis) of the readers and the CLI's argument parsing (issue 17).

The property: whatever the bytes or the arguments, a reader returns an image or raises a
:class:`~napari_medsam.core.errors.MedSamError` (also when the lazily read pixels are touched), and
the parser accepts the arguments or exits with status 2 and one error line. A handful of examples
per test keeps the whole file well under a minute.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_medsam.cli import build_parser
from napari_medsam.core.errors import MedSamError
from napari_medsam.io import read_image

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

EXTENSIONS = (".nii", ".nii.gz", ".tif", ".npy", ".mgh", ".mgz", ".nrrd", ".mha", ".hdr")


def _valid_files(root: Path) -> dict[str, bytes]:
    """Small valid files of several formats, as bytes to mutate."""
    import nrrd
    import SimpleITK as sitk

    data = np.random.default_rng(0).integers(0, 900, (4, 10, 12)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), root / "a.nii")
    nib.save(nib.Nifti1Image(data, np.eye(4)), root / "a.nii.gz")
    nib.save(nib.MGHImage(data.astype(np.float32), np.eye(4)), root / "a.mgh")
    tifffile.imwrite(root / "a.tif", data, photometric="minisblack")
    np.save(root / "a.npy", data)
    nrrd.write(str(root / "a.nrrd"), data)
    sitk.WriteImage(sitk.GetImageFromArray(data), str(root / "a.mha"))
    return {p.name: p.read_bytes() for p in root.iterdir()}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return _valid_files(tmp_path_factory.mktemp("fuzz_valid"))


def _read_fully(path: Path) -> None:
    """Read ``path`` and touch its pixels; only a MedSamError may come out."""
    try:
        vol = read_image(path)
        if vol.data.size <= 10**6:
            np.asarray(vol.data[...])
        else:  # lazily read: one slice
            vol.slice(0, 0)
    except MedSamError:
        pass


@FUZZ
@given(ext=st.sampled_from(EXTENSIONS), payload=st.binary(max_size=2048))
def test_random_bytes_never_escape_as_another_exception(ext, payload):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{ext}"
        path.write_bytes(payload)
        _read_fully(path)


@FUZZ
@given(data=st.data())
def test_mutated_valid_files_never_escape(valid, data):
    name = data.draw(st.sampled_from(sorted(valid)))
    raw = bytearray(valid[name])
    # flips in the first 512 bytes (headers: shapes, dtypes, offsets), a few anywhere, or truncation
    for _ in range(data.draw(st.integers(1, 6))):
        limit = min(len(raw), 512) if data.draw(st.booleans()) else len(raw)
        at = data.draw(st.integers(0, limit - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(bytes(raw))
        _read_fully(path)


_PARSER = build_parser()
_TEXT = st.text(alphabet="0123456789-.,eEinfnaxbc ", max_size=24)
_OPTIONS = ("--box", "--point", "--window", "--axis", "--slices", "--lr", "--epochs", "--batch-size")


def _parse(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            _PARSER.parse_args(argv)
        except SystemExit as e:
            return int(e.code or 0), err.getvalue()
    return 0, err.getvalue()


@FUZZ
@given(option=st.sampled_from(_OPTIONS), value=_TEXT)
def test_argument_parsing_accepts_or_gives_one_line(option, value):
    command = {"--box": "segment", "--point": "segment", "--window": "segment", "--axis": "segment",
               "--slices": "embed", "--lr": "train", "--epochs": "train", "--batch-size": "embed"}[option]
    argv = {"segment": ["segment", "x.nii.gz", "-o", "y.nii.gz"], "embed": ["embed", "x.nii.gz"],
            "train": ["train", "x.nii.gz", "l.nii.gz", "--head", "cnn", "-o", "h.pt"]}[command]
    code, err = _parse([*argv, f"{option}={value}"])
    assert code in (0, 2)
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err


def test_fuzz_files_leave_nothing_behind():
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(".fuzz")]
