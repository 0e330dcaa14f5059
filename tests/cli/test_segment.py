"""``napari-medsam segment --propagate [--range A:B]``: one box carried through a slice range."""

import functools

import numpy as np
import pytest

import napari_medsam.core.propagation as propagation
from napari_medsam.cli import main


@pytest.fixture()
def volume(tmp_path):
    img = tmp_path / "vol.npy"
    rng = np.random.default_rng(3)
    np.save(img, rng.integers(0, 800, (12, 40, 37)).astype(np.int16))
    return img


def _args(tmp_path, img, *extra):
    return ["segment", str(img), "--model", "test_tiny_lite", "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
            "--box", "6,4,4,30,30", "--propagate", "-o", str(tmp_path / "out.npy"), "--overwrite", *extra]


@pytest.fixture()
def keep_going(monkeypatch):
    """Propagation that stops only where the mask vanishes, so the range is what bounds it."""
    real = propagation.propagate
    monkeypatch.setattr(propagation, "propagate",
                        functools.partial(real, params=propagation.PropagationParams.permissive()))


def _labelled(tmp_path):
    arr = np.load(tmp_path / "out.npy")
    return {int(z) for z in np.flatnonzero(arr.reshape(arr.shape[0], -1).any(axis=1))}


def test_range_is_inclusive_and_bounds_what_is_written(tmp_path, volume, capsys, keep_going):
    assert main(_args(tmp_path, volume)) == 0
    whole = _labelled(tmp_path)
    assert 6 in whole and len(whole) > 5  # without --range: the whole volume is open to it
    assert main(_args(tmp_path, volume, "--range", "4:8")) == 0
    out = capsys.readouterr().out
    got = _labelled(tmp_path)
    assert 6 in got and got <= {4, 5, 6, 7, 8} and got == whole & {4, 5, 6, 7, 8}
    assert "range end" in out  # the printed stops say why each direction ended


@pytest.mark.parametrize(("rng", "needle"), [
    ("4", "START:STOP"),
    ("a:b", "whole numbers"),
    ("9:3", "holds no slice"),
    ("8:11", "seed slice 6 is outside the range 8..11"),
])
def test_bad_range_is_a_one_line_error(tmp_path, volume, capsys, rng, needle):
    assert main(_args(tmp_path, volume, "--range", rng)) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_range_without_propagate_is_refused(tmp_path, volume, capsys):
    args = [a for a in _args(tmp_path, volume, "--range", "2:9") if a != "--propagate"]
    assert main(args) == 1
    assert "add --propagate" in capsys.readouterr().err
