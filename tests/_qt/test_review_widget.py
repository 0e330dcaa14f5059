"""The Review dock on a real (subsampled) MNI volume: three rounds, accept, suggestions, resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

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
        assert len(w.round_plot.rounds) == rnd + 1 and len(w.round_plot.points("cv_dice")) == rnd + 1
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


KILL_CHILD = textwrap.dedent("""
    import functools, itertools, sys, time
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    import napari_medsam._qt.review_widget as rw
    root, image, truth, log_path, mode = sys.argv[1:6]
    t1, truth = np.load(image), np.load(truth)
    viewer = napari.Viewer(show=False)
    viewer.add_image(t1, name="mni")
    labels = viewer.add_labels(np.zeros_like(truth), name="truth")
    _, w = viewer.window.add_plugin_dock_widget("napari-medsam", "Review")
    w.autosave_root = root
    w.session.load_model("test_tiny_lite")
    app = QApplication.instance()
    log = open(log_path, "a", buffering=1)
    def say(*words):
        log.write(" ".join(map(str, words)) + f" {time.time()}\\n")
    def pump(seconds, until=lambda: False):
        end = time.monotonic() + seconds
        while time.monotonic() < end and not until():
            app.processEvents()
            time.sleep(0.01)
    def paint(s, swap=0):  # a stroke over the whole slice, through the layer (paint event, undo history)
        idx = tuple(a.ravel() for a in np.indices(truth[s].shape))
        full = (np.full(idx[0].shape, s), *idx)
        v = truth[full]
        labels.data_setitem(full, np.where(v > 0, 3 - v, 0) if swap else v)  # swap: GM and WM exchanged
        say("painted", s, swap)
    w.start()
    pump(60, lambda: w.setup_job.done and w.saver is not None)
    say("ready", 0)
    for s in (12, 25, 38):
        paint(s)
        pump(0.2)
    if mode == "train":  # a round that trains for minutes: no early stop, many steps
        rw.TrainParams = functools.partial(rw.TrainParams, patience=0)
        w.head_combo.setCurrentText("cnn")
        w.steps_spin.setValue(100000)
        w.run_round()
        pump(60, lambda: w.status.text().startswith("training"))
        say("training", 0)
        paint(30)
        while True:
            pump(0.5)
            say("round", "done" if w.round_job.done else w.status.text().split()[0])
    slices = [s for s in range(2, 48, 3) if truth[s].any()]
    for p in itertools.count(1):  # no pause: a stroke every 0.25 s, each pass changes every slice
        for s in slices:
            paint(s, p % 2)
            pump(0.25)
""")


LOST_S = 7.5  # the most seconds of painting a kill may lose (the dock saves at least every 6 s)


def run_and_kill(tmp_path, t1, truth, mode, kill_after):
    """Run the Review dock in a child napari, SIGKILL it ``kill_after(log lines)`` s after it painted."""
    np.save(tmp_path / "t1.npy", t1)
    np.save(tmp_path / "truth.npy", truth)
    log = tmp_path / f"{mode}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", NAPARI_MEDSAM_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(tmp_path / "sessions"), str(tmp_path / "t1.npy"),
                             str(tmp_path / "truth.npy"), str(log), mode], env=env)
    try:
        deadline = time.monotonic() + 50
        while True:
            assert proc.poll() is None, f"the child ended early: {log.read_text() if log.exists() else ''}"
            lines = [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []
            when = kill_after(lines)
            if when is not None and time.time() >= when:
                break
            assert time.monotonic() < deadline, f"the child never got there: {lines[-3:]}"
            time.sleep(0.05)
    finally:
        t_kill = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return [ln.split() for ln in log.read_text().splitlines()], t_kill


def resume_in_a_fresh_dock(qtbot, w, labels):
    w.start()
    wait_job(qtbot, w.setup_job)
    assert w.snapshot is not None and not w.resume_button.isHidden(), w.status.text()
    w.resume()
    return w.loop


@pytest.mark.timeout(120)
def test_kill_9_while_painting_then_a_fresh_dock_resumes_the_edits(setup, qtbot, tmp_path):
    viewer, w, image, labels, truth = setup
    t0 = time.monotonic()

    def nine_s_after_the_sixth_stroke(lines):  # however slowly a loaded machine paints
        painted = [float(ln[-1]) for ln in lines if ln[0] == "painted"]
        return painted[5] + 9.0 if len(painted) >= 6 else None

    lines, t_kill = run_and_kill(tmp_path, image.data, truth, "paint", nine_s_after_the_sixth_stroke)
    strokes = [(int(ln[1]), int(ln[2]), float(ln[3])) for ln in lines if ln[0] == "painted"]
    assert strokes[-1][2] > t_kill - 1.0  # it was painting when it was killed
    must = {s for s, _, t in strokes if t <= t_kill - LOST_S}  # painted more than LOST_S before the kill
    assert {12, 25, 38, 8, 11, 14} <= must  # the first six strokes
    assert any(v for s, v, t in strokes if t <= t_kill - LOST_S)  # repaints that changed slices, too
    loop = resume_in_a_fresh_dock(qtbot, w, labels)
    assert must <= set(loop.reviewed()) <= {s for s, _, _ in strokes}
    versions = (truth, np.where(truth > 0, 3 - truth, 0))
    for s in loop.reviewed():  # each slice as its last stroke older than LOST_S left it, or a later one
        mine = [(v, t) for s2, v, t in strokes if s2 == s]
        since = max([t for _, t in mine if t <= t_kill - LOST_S], default=-math.inf)
        assert any(np.array_equal(labels.data[s], versions[v][s]) for v, t in mine if t >= since), s
    assert not labels.data[[s for s in range(truth.shape[0]) if s not in loop.reviewed()]].any()
    assert time.monotonic() - t0 < 60


@pytest.mark.timeout(120)
def test_kill_9_while_training_then_a_fresh_dock_resumes_the_edits(setup, qtbot, tmp_path):
    viewer, w, image, labels, truth = setup
    t0 = time.monotonic()

    def after_the_painting_during_training_was_saved(lines):
        painted = [float(ln[-1]) for ln in lines if ln[:2] == ["painted", "30"]]
        return painted[0] + 6.0 if painted else None  # the dock saves 3 s after the last edit

    lines, t_kill = run_and_kill(tmp_path, image.data, truth, "train", after_the_painting_during_training_was_saved)
    states = [ln[1] for ln in lines if ln[0] == "round"]
    assert states and set(states) == {"training"}, states  # killed while the round was still training
    loop = resume_in_a_fresh_dock(qtbot, w, labels)
    assert loop.reviewed() == (12, 25, 30, 38) and loop.rounds == []
    for s in loop.reviewed():
        assert np.array_equal(labels.data[s], truth[s]), s
    assert time.monotonic() - t0 < 60
