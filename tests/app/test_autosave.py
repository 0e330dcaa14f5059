"""Autosave: atomic snapshots with checksums, fallback to the last good one, debounced saving, kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from napari_medsam.app import autosave
from napari_medsam.app.autosave import Autosaver, SessionStore, session_folder
from napari_medsam.app.loop import ReviewLoop, RoundParams
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.finetune import TrainParams
from napari_medsam.core.infer import predict_slices
from napari_medsam.core.progress import drain

HASH = "0123456789abcdef0123456789abcdef"


def small_loop():
    loop = ReviewLoop(np.zeros((6, 10, 7), np.uint8), axis=1, class_names={1: "a"})
    loop.labels[:, 3, :] = 1
    loop.on_user_edit([3])
    loop.set_proposal(5, np.full((6, 7), 1, np.uint8))
    return loop


def test_session_folder_beside_the_image_or_in_the_user_data_dir(tmp_path, monkeypatch):
    img = tmp_path / "scan.nii.gz"
    assert session_folder(HASH, img) == tmp_path / ".napari-medsam" / HASH
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setattr(autosave.os, "access", lambda *a, **k: False)  # a read-only image folder
    assert session_folder(HASH, img) == tmp_path / "data" / "napari-medsam" / "sessions" / HASH
    assert session_folder(HASH, root=tmp_path / "r") == tmp_path / "r" / HASH
    with pytest.raises(Exception, match="content hash"):
        session_folder("../etc", img)


def test_save_load_round_trip_with_heads(tmp_path, tiny_lite, mni):
    t1 = np.asarray(mni["t1"], np.float32)[::6, ::6, ::6]
    brain = mni["brain"][::6, ::6, ::6].astype(np.uint8)
    enc = VolumeEncoder(tiny_lite, t1, axis=2)
    loop = ReviewLoop(np.zeros_like(brain), axis=2, class_names={1: "brain"})
    loop.labels[:, :, 15] = brain[:, :, 15]
    loop.on_user_edit([15])
    fast = RoundParams(train=TrainParams(head="cnn", max_steps=10, patience=0, threads=0), cv_folds=0)
    drain(loop.round_steps(enc, fast))
    loop.labels[:, :, 20] = brain[:, :, 20]
    loop.on_user_edit([20])
    drain(loop.round_steps(enc, fast))
    loop.mark_reviewed([9])  # reviewed after the last round: its proposal is pending
    store = SessionStore(tmp_path / "s")
    seq = store.save(loop, extra={"note": "x"})
    snap = SessionStore(tmp_path / "s").load()
    assert snap.seq == seq and snap.extra == {"note": "x"}
    back = snap.to_loop(loaded=tiny_lite)
    assert np.array_equal(back.labels, loop.labels) and np.array_equal(back.proposals, loop.proposals)
    assert back.reviewed() == (9, 15, 20) and back.proposed == loop.proposed
    assert set(back.pending()) == {9} and np.array_equal(back.pending()[9], loop.pending()[9])
    assert [r.metrics["n_reviewed"] for r in back.rounds] == [1, 2]
    a = drain(predict_slices(enc, loop.head, slices=[10])).labels
    b = drain(predict_slices(enc, back.head, slices=[10])).labels
    assert np.array_equal(a, b)  # the head came back bit for bit
    # the next save writes no head again; old snapshots go, the newest KEEP stay
    for _ in range(4):
        store.save(loop)
    assert len(store.manifests()) == autosave.KEEP
    assert len(list((tmp_path / "s" / "heads").glob("*.head.pt"))) == 2
    assert len(list((tmp_path / "s").glob("snap-*"))) == autosave.KEEP


def test_a_torn_or_corrupt_snapshot_falls_back_to_the_last_good_one(tmp_path):
    loop = small_loop()
    store = SessionStore(tmp_path)
    good = store.save(loop)
    loop.labels[:, 4, :] = 1
    loop.on_user_edit([4])
    bad = store.save(loop)
    lab = tmp_path / f"snap-{bad:08d}" / "labels.npy"
    raw = bytearray(lab.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte
    lab.write_bytes(bytes(raw))
    (tmp_path / f"snap-{bad + 1:08d}").mkdir()  # a save killed before its manifest
    (tmp_path / f"manifest-{bad + 2:08d}.json").write_text("{not json")  # a torn manifest
    snap = store.load()
    assert snap.seq == good and snap.state["reviewed"]["1"] == [3]
    assert not (snap.labels[:, 4, :]).any()
    # the next save is numbered after everything on disk and does not remove the good one
    newer = store.save(loop)
    assert newer > bad + 2 and store.load().seq == newer
    assert store.manifests() == [newer, good]  # the unusable ones are gone, the good one stays
    assert not (tmp_path / f"snap-{bad + 1:08d}").exists()
    assert SessionStore(tmp_path / "none").load() is None


def test_autosaver_debounces_and_saves_after_rounds(tmp_path):
    loop = small_loop()
    store = SessionStore(tmp_path)
    saver = Autosaver(loop, store, delay=0.3, max_delay=1.0)
    try:
        loop.on_user_edit([3])
        time.sleep(0.1)
        assert saver.saves == 0  # not yet: edits may still come
        deadline = time.monotonic() + 10
        while saver.saves == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert saver.saves == 1 and not saver.dirty
        # continuous edits: saved within max_delay all the same
        t0 = time.monotonic()
        while saver.saves < 2 and time.monotonic() - t0 < 10:
            loop.on_user_edit([3])
            time.sleep(0.05)
        assert saver.saves == 2 and time.monotonic() - t0 < 5
        loop.round_finished.emit(None)  # after a round: at once
        deadline = time.monotonic() + 10
        while saver.saves < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert saver.saves == 3
        loop.on_user_edit([3])
    finally:
        saver.close()
    assert saver.saves == 4 and not saver.dirty  # close saved the last edit


CHILD = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    from napari_medsam.app.autosave import Autosaver, SessionStore
    from napari_medsam.app.loop import ReviewLoop, RoundParams
    folder, log, train = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    N, V = 20, (3 if train else 251)  # label values cycle through V (few classes while training)
    store = SessionStore(folder)
    snap = store.load()
    if snap is None:
        loop, j = ReviewLoop(np.zeros((16, N, 16), np.uint8), axis=1), 0
    else:
        loop, j = snap.to_loop(), int(snap.extra["edits"])
    count = {"j": j}
    saver = Autosaver(loop, store, delay=0.2, max_delay=1.0, extra=lambda: {"edits": count["j"]})
    if train:  # rounds run back to back in a thread while the painting goes on
        from napari_medsam.core.build import load_model
        from napari_medsam.core.encoder import VolumeEncoder
        from napari_medsam.core.finetune import TrainParams
        from napari_medsam.core.progress import drain
        rng = np.random.default_rng(0)
        enc = VolumeEncoder(load_model("test_tiny_lite", device="cpu"), rng.normal(size=(16, N, 16)), axis=1)
        params = RoundParams(train=TrainParams(head="linear", max_steps=30, patience=0, threads=1), cv_folds=0)
        def rounds():
            while True:
                drain(loop.round_steps(enc, params))
        threading.Thread(target=rounds, daemon=True).start()
    with open(log, "a") as f:
        f.write(f"start {j}\\n")
        f.flush()
        while True:
            with loop._lock:
                j += 1
                s = j % N
                loop.labels[:, s, :] = j % V + 1
                count["j"] = j
                loop.on_user_edit([s])
            if j % 10 == 0:
                f.write(f"{j} {time.time()}\\n")
                f.flush()
            time.sleep(0.003)
""")


def expected(m, n=20, v=251):
    lab = np.zeros(n, np.uint8)
    for j in range(1, m + 1):
        lab[j % n] = j % v + 1
    return lab, {j % n for j in range(1, m + 1)}


def kill_cycles(tmp_path, train, cycles, wait_range, lost_s):
    folder, log = tmp_path / "session", tmp_path / "log.txt"
    rnd = random.Random(7 + train)
    previous = 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for cycle in range(cycles):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(log), "1" if train else "0"], env=env)
        try:
            deadline = time.monotonic() + 120
            while not log.exists() or log.read_text().count("start") < cycle + 1:
                assert proc.poll() is None, "the child ended early"
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(rnd.uniform(*wait_range))
        finally:
            t_kill = time.time()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        snap = SessionStore(folder).load()
        assert snap is not None
        m = int(snap.extra["edits"])
        lab, reviewed = expected(m, v=3 if train else 251)
        assert np.array_equal(snap.labels[0, :, 0], lab) and (snap.labels == snap.labels[0:1, :, 0:1]).all()
        assert set(snap.state["reviewed"]["1"]) == reviewed  # labels and reviewed set from one moment
        for p in snap.head_files:  # every head a snapshot names is there, whole
            assert p is not None and p.is_file()
        snap.heads()
        done = [int(a) for a, t in (line.split() for line in log.read_text().splitlines() if not line.startswith("s"))
                if float(t) <= t_kill - lost_s]
        assert m >= max([previous, *done]), (f"cycle {cycle}: saved {m} edits, {max(done, default=0)} were "
                                             f"done {lost_s} s before the kill")
        previous = m
    return previous


def test_kill_9_while_painting_loses_at_most_the_last_seconds(tmp_path):
    assert kill_cycles(tmp_path, False, cycles=3, wait_range=(1.0, 2.5), lost_s=3.0) > 0


@pytest.mark.slow
def test_kill_9_while_training_loses_at_most_the_last_seconds(tmp_path):
    m = kill_cycles(tmp_path, True, cycles=2, wait_range=(4.0, 8.0), lost_s=4.0)
    snap = SessionStore(tmp_path / "session").load()
    assert m > 0 and snap.state["rounds"], "no round finished before the kills"
    assert json.loads((snap.folder / "state.json").read_text()) == snap.state
