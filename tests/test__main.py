"""``python -m napari_medsam`` / ``napari-medsam gui``: without a display it runs the job headless."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from napari_medsam import __main__ as entry


def test_has_display_follows_the_environment(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    assert not entry.has_display()
    monkeypatch.setenv("DISPLAY", ":99")
    assert entry.has_display()
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert not entry.has_display()


def test_headless_run_says_so_and_segments(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["NAPARI_MEDSAM_CACHE"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "napari_medsam", "--model", "test_tiny_lite"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "no display" in text
    assert "mni_icbm152_t1" in text and "embedded slices" in text and "segmented slice" in text


def test_headless_job_on_a_given_image(tmp_path):
    import numpy as np

    from napari_medsam._sample_data import synthetic_volume

    path = tmp_path / "ct.npy"
    np.save(path, synthetic_volume((6, 40, 40)))
    res = entry.run_headless(path, model="test_tiny_lite", n_slices=3)
    assert res["slices"] == [2, 3, 4] and res["slice"] == 3
    r0, c0, r1, c1 = res["box"]
    assert 0 <= r0 < r1 <= 40 and 0 <= c0 < c1 <= 40


def test_gui_subcommand_parses(monkeypatch):
    import argparse

    from napari_medsam.cli import gui

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    gui.register(sub)
    args = parser.parse_args(["gui", "scan.nii.gz", "--model", "test_tiny_lite", "--headless"])
    calls = []
    monkeypatch.setattr(entry, "launch", lambda *a, **k: calls.append((a, k)))
    assert args.func(args) == 0
    assert calls == [(("scan.nii.gz",), {"model": "test_tiny_lite", "device": "auto", "headless": True})]


@pytest.mark.gui
def test_launch_opens_the_window_with_the_widgets(qtbot, monkeypatch):
    if not entry.has_display():
        pytest.skip("needs a display (run under xvfb-run)")
    import napari.settings as ns
    from napari.settings._napari_settings import NapariSettings

    monkeypatch.setattr(ns, "_SETTINGS", NapariSettings(config_path=None))  # the docks write a reader preference
    viewer = entry.launch(model="test_tiny_lite", block=False)
    try:
        assert viewer.layers[0].name == "MNI152 T1"
        assert tuple(viewer.dims.order) == (2, 1, 0)  # axial (the template is RAS), radiological
        assert tuple(str(v) for v in viewer.scene.camera.orientation2d) == ("up", "left")
        assert viewer.dims.current_step[2] == viewer.layers[0].data.shape[2] // 2
        assert ns.get_settings().plugins.extension2reader["*.nii.gz"] == "napari-medsam"
        docks = set(viewer.window._dock_widgets)
        assert any("Model" in d for d in docks) and any("Annotate" in d for d in docks)
        from napari_medsam._qt.session import session_for

        qtbot.waitUntil(lambda: session_for(viewer).loaded is not None, timeout=120_000)
        assert session_for(viewer).loaded.name == "test_tiny_lite"
    finally:
        viewer.close()
