"""The Review dock on a real (subsampled) MNI volume: three rounds, accept, suggestions, resume."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.app.loop import dice_score

from .conftest import PLUGIN, wait_job

pytestmark = pytest.mark.gui


@pytest.fixture
def setup(make_napari_viewer, qtbot, mni, tmp_path):
    viewer = make_napari_viewer()
    t1 = np.asarray(mni["t1"], np.float32)[::4, ::4, ::4]  # 50 x 59 x 48: sagittal slices along axis 0
    gm, wm = mni["gm"][::4, ::4, ::4], mni["wm"][::4, ::4, ::4]
    truth = np.where(gm + wm > 0.5, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    image = viewer.add_image(t1, name="mni")
    labels = viewer.add_labels(np.zeros_like(truth), name="truth")
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
    w.autosave_root = tmp_path / "sessions"
    w.session.load_model("test_tiny_lite")
    return viewer, w, image, labels, truth


def paint_slice(labels, truth, s):
    """What a user's paint stroke does: write voxels through the layer (undo history, paint event)."""
    idx = tuple(a.ravel() for a in np.indices(truth[s].shape))
    full = (np.full(idx[0].shape, s), *idx)
    labels.data_setitem(full, truth[full])


def unreviewed_dice(loop, truth):
    rest = [s for s in range(truth.shape[0]) if not loop.is_reviewed(s)]
    return dice_score(loop.proposals[rest], truth[rest], (1, 2))


def test_three_rounds_from_the_dock(setup, qtbot):
    viewer, w, image, labels, truth = setup
    w.head_combo.setCurrentText("linear")
    loop = w.start()
    assert loop is not None and loop.axis == 0 and w.proposals_layer is not None
    wait_job(qtbot, w.setup_job)
    for s in (12, 25, 38):
        paint_slice(labels, truth, s)
    assert loop.reviewed() == (12, 25, 38)  # the paint events made them reviewed
    dices = []
    for rnd in range(3):
        before = {s: labels.data[s].tobytes() for s in loop.reviewed()}
        job = w.run_round()
        assert job is not None
        wait_job(qtbot, job, timeout=300_000)
        assert len(loop.rounds) == rnd + 1
        assert all(labels.data[s].tobytes() == b for s, b in before.items())  # reviewed slices untouched
        assert all(not w.proposals_layer.data[s].any() for s in loop.reviewed())
        dices.append(unreviewed_dice(loop, truth))
        assert f"{rnd + 1:>5}" in w.metrics_label.text()
        assert w.suggest_list.count() > 0
        # the user goes to the next suggestion and corrects it; accepts another proposal as it is
        s = w.next_suggested()
        assert s is not None and w.current() == s and not loop.is_reviewed(s)
        paint_slice(labels, truth, s)
        nxt = loop.suggest(1)[0][0]
        w.go_to(nxt)
        shown = loop.proposals[nxt].copy()
        assert w.accept_current() and np.array_equal(labels.data[nxt], shown) and loop.is_reviewed(nxt)
    print("unreviewed Dice per round", [round(d, 3) for d in dices])
    assert all(np.isfinite(dices)) and loop.rounds[-1].metrics["warm_start"]
    m = loop.rounds[-1].metrics
    assert m["n_compared"] == 2 and np.isfinite(m["proposal_dice"]) and np.isfinite(m["cv_dice"])
    assert dices[-1] > dices[0]
    # accept a range: every unreviewed slice in it takes its proposal
    done = w.accept_range(0, 5)
    assert done and all(loop.is_reviewed(s) for s in done)


def test_an_autosaved_session_is_offered_and_resumed(setup, qtbot):
    viewer, w, image, labels, truth = setup
    loop = w.start()
    wait_job(qtbot, w.setup_job)
    paint_slice(labels, truth, 20)
    w.saver.flush()
    assert w.saver.saves == 1
    w.cleanup()
    labels.data = np.zeros_like(truth)  # the session is gone (a crash, a new napari)
    loop = w.start()
    wait_job(qtbot, w.setup_job)
    assert w.snapshot is not None and not w.resume_button.isHidden() and "resumed" in w.status.text().lower()
    w.resume()
    assert w.loop is not loop and w.loop.reviewed() == (20,)
    assert np.array_equal(labels.data[20], truth[20]) and w.loop.labels is labels.data
    assert w.proposals_layer.data is w.loop.proposals


def test_opening_the_review_dock_does_not_import_torch(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import sys, napari\n"
            "v = napari.Viewer(show=False)\n"
            "v.window.add_plugin_dock_widget('napari-medsam', 'Review')\n"
            "print('TORCH', 'torch' in sys.modules)\n"
            "v.close()\n")
    env = dict(os.environ, NAPARI_MEDSAM_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "TORCH False" in out.stdout, out.stdout + out.stderr
