"""``napari-medsam segment --zoom CONTEXT | --no-zoom``: a small box segmented on the window around it."""

import re

import numpy as np
import pytest

from napari_medsam.app.params import ModelChoice
from napari_medsam.app.session import AnnotationSession
from napari_medsam.cli import main
from napari_medsam.core.segment import Prompt2D

SMALL = (50, 42, 62, 58)  # on a 120 x 100 slice: a 32 px window by default, x3.75


@pytest.fixture()
def volume(tmp_path):
    vol = np.random.default_rng(5).integers(0, 300, (3, 120, 100)).astype(np.int16)
    vol[1, 52:60, 44:56] = 900
    path = tmp_path / "vol.npy"
    np.save(path, vol)
    return path, vol


def _segment(tmp_path, img, *extra):
    out = tmp_path / "out.npy"
    rc = main(["segment", str(img), "--model", "test_tiny_lite", "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
               "--box", "1,{},{},{},{}".format(*SMALL), "-o", str(out), "--overwrite", *extra])
    assert rc == 0
    return np.load(out)[1] == 1


@pytest.fixture()
def session(volume):
    s = AnnotationSession(disk_cache=False)
    s.load_model(ModelChoice("test_tiny_lite", device="cpu"))
    s.open_image(volume[1], axis=0)
    return s


def test_a_small_box_is_zoomed_by_default_and_not_with_no_zoom(tmp_path, volume, session, capsys):
    img, _vol = volume
    prompt = Prompt2D.from_box(SMALL)
    zoomed = _segment(tmp_path, img)
    line = capsys.readouterr().out
    m = re.search(r"zoomed x3\.8 on rows (\d+):(\d+) columns (\d+):(\d+)", line)
    assert m, line
    r0, r1, c0, c1 = (int(v) for v in m.groups())
    assert (r1 - r0, c1 - c0) == (32, 32)
    outside = np.ones_like(zoomed)
    outside[r0:r1, c0:c1] = False
    assert zoomed.any() and not zoomed[outside].any()
    np.testing.assert_array_equal(zoomed, session.refine(1, prompt).mask)  # what the dock commits
    plain = _segment(tmp_path, img, "--no-zoom")
    assert ", zoomed x" not in capsys.readouterr().out
    np.testing.assert_array_equal(plain, session.preview(1, prompt).mask)
    assert not np.array_equal(plain, zoomed)
    wider = _segment(tmp_path, img, "--zoom", "4")
    assert "zoomed x1.9 on rows" in capsys.readouterr().out  # a 64 px window
    session.zoom = 4.0
    np.testing.assert_array_equal(wider, session.refine(1, prompt).mask)


def test_a_large_box_is_not_zoomed(tmp_path, volume, capsys):
    img, _vol = volume
    out = tmp_path / "big.npy"
    assert main(["segment", str(img), "--model", "test_tiny_lite", "--device", "cpu", "--cache-dir",
                 str(tmp_path / "c"), "--box", "1,5,5,110,95", "-o", str(out)]) == 0
    assert ", zoomed x" not in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--zoom", "0.5"], ["--zoom", "x"], ["--zoom", "3", "--no-zoom"]])
def test_bad_zoom_arguments_are_usage_errors(tmp_path, volume, capsys, extra):
    img, _vol = volume
    with pytest.raises(SystemExit) as e:
        main(["segment", str(img), "--box", "1,5,5,20,20", "-o", str(tmp_path / "o.npy"), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--zoom" in err and len(err.strip().splitlines()) == 1
