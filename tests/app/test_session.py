"""The annotation session on its own: verbs, signals, edits, thread policy (tiny model, no viewer)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from napari_medsam.app import session as session_mod
from napari_medsam.app.params import ModelChoice
from napari_medsam.app.session import AnnotationSession
from napari_medsam.core.errors import MedSamError
from napari_medsam.core.segment import Prompt2D


def test_preview_steps_tell_the_thread_policy_about_running_jobs(monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def fake_worker_threads(*, background_busy=False):
        seen.append(background_busy)
        raise Stop

    monkeypatch.setattr(session_mod, "worker_threads", fake_worker_threads)
    s = AnnotationSession(disk_cache=False)
    for jobs in (0, 1):
        s.cpu_jobs = jobs
        gen = s.preview_steps(None, 0, None)
        next(gen)
        with contextlib.suppress(Stop):
            next(gen)
    assert seen == [False, True]


def test_verbs_say_what_is_missing():
    s = AnnotationSession(disk_cache=False)
    with pytest.raises(MedSamError, match="open_image"):
        s.request()
    s.open_image(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(MedSamError, match="no model is loaded"):
        s.encoder()
    with pytest.raises(MedSamError, match="nothing to propagate"):
        s.propagate(1)
    with pytest.raises(MedSamError, match="no head"):
        s.predict()
    with pytest.raises(MedSamError, match="do not fit"):
        s.open_image(np.zeros((3, 16, 16), np.float32), labels=np.zeros((3, 16, 15), np.uint8))


def test_hold_cpu_counts_a_job_until_it_is_done():
    class FakeJob:
        done = False

        def add_done_callback(self, fn):
            self.fn = fn

    s = AnnotationSession(disk_cache=False)
    counts = []
    s.busy_changed.connect(counts.append)
    job = FakeJob()
    assert s.hold_cpu(job) is job and s.cpu_jobs == 1
    job.fn(job)
    assert s.cpu_jobs == 0 and counts == [1, 0]
    assert s.hold_cpu(None) is None


@pytest.fixture
def annotated(tmp_path):
    """A session on a bright square moving through 7 slices, the tiny model loaded."""
    vol = np.zeros((7, 40, 40), np.float32)
    for z in range(7):
        vol[z, 10 + z:26 + z, 8:24] = 200.0
    s = AnnotationSession(cache_dir=tmp_path / "emb", disk_cache=False)
    models = []
    s.model_changed.connect(models.append)
    s.load_model(ModelChoice("test_tiny_lite", device="cpu"))
    assert models and models[-1] is s.loaded and s.model_choice.name == "test_tiny_lite"
    s.open_image(vol, axis=0)
    return s, vol


def test_commit_propagate_undo_write_the_session_labels_and_say_so(annotated):
    s, _vol = annotated
    changed = []
    s.labels_changed.connect(lambda axis, slices: changed.append((axis, slices)))
    res = s.preview(3, Prompt2D.from_box((12, 7, 30, 25)))
    assert res.mask.shape == (40, 40) and not s.labels.data.any()  # a preview writes nothing
    res.mask[:] = False
    res.mask[13:29, 8:24] = True  # what the user accepted (the tiny random model's mask is noise)
    edit = s.commit(3, res, 1)
    assert edit.n_voxels == 16 * 16 and changed == [(0, (3,))]
    assert s.edits.committed(s.labels, 1, 0) == {3}
    seen = {}
    square = np.zeros((40, 40), bool)
    square[5:35, 5:35] = True

    def fake_propagate(req, seeds, params=None, *, cancel=None, span=None):  # the real one: tests/app/test_session_workflow.py
        seen.update(seeds)
        yield from ()
        return dict.fromkeys((2, 3, 4), square)

    s.propagate_steps = fake_propagate
    proposed = []
    s.proposals_changed.connect(lambda axis, slices: proposed.append((axis, slices)))
    masks = s.propagate(1)
    assert list(seen) == [3] and seen[3].box == pytest.approx((13, 8, 29, 24))  # seeded by the commit
    # the committed slice is kept as it is; the others are proposals (not reviewed: no labels_changed)
    assert sorted(masks) == [2, 3, 4] and proposed == [(0, (2, 4))] and changed == [(0, (3,))]
    assert int(s.labels.data[3].sum()) == 16 * 16 and int(s.labels.data[2].sum()) == 30 * 30
    before = s.labels.data.copy()
    undone = s.undo()
    assert undone is not None and undone.description.startswith("propagate")
    assert proposed[-1] == (0, tuple(sorted(set(undone.slices)))) and len(changed) == 1
    assert (s.labels.data != before).any() and int(s.labels.data.sum()) == 16 * 16  # back to the commit
    assert s.edits.committed(s.labels, 1, 0) == {3}
    assert s.undo().description.startswith("commit") and not s.labels.data.any()
    assert s.undo() is None


def test_train_predict_save_restore(annotated, tmp_path):
    from napari_medsam.core.finetune import TrainParams

    s, vol = annotated
    s.class_names = {1: "square"}
    truth = (vol > 100).astype(np.uint16)
    for z in (1, 5):
        s.commit(z, truth[z] > 0, 1)
    heads = []
    s.head_changed.connect(heads.append)
    head = s.train_head(TrainParams(head="linear", epochs=2))
    assert heads == [head] and s.head is head
    assert head.meta.training_slices == (1, 5) and list(head.meta.class_names) == ["square"]
    pred = s.predict()
    assert pred.labels.shape == vol.shape and pred.slices == tuple(range(7))

    out = s.save_labels(tmp_path / "labels.nii.gz")
    s.open_image(vol, axis=0)
    assert not s.labels.data.any()
    changed = []
    s.labels_changed.connect(lambda axis, slices: changed.append((axis, slices)))
    data = s.restore_labels(out)
    np.testing.assert_array_equal(data, np.where(np.isin(np.arange(7), (1, 5))[:, None, None], truth, 0))
    assert changed == [(0, (1, 5))]
    assert s.edits.committed(s.labels, 1, 0) == {1, 5}  # restored slices seed propagation
    with pytest.raises(Exception, match="do not fit"):
        s.open_image(vol[:, :, :30], axis=0)
        s.restore_labels(out)


def test_the_session_has_a_slot_for_the_review_loop():
    s = AnnotationSession(disk_cache=False)
    assert s.loop is None


def test_embed_slice_steps_say_embedded_before_the_cache_write(annotated):
    """A box on a slice not embedded yet: the mask can be decoded (and shown) as soon as the slice is
    embedded; its cache write (20-200 ms) comes after that step, not before it."""
    s, _vol = annotated
    enc = s.encoder(s.request())
    gen = s.embed_slice_steps(None, 4)
    steps = []
    for p in gen:
        steps.append((p.message, enc.key(4) in enc.cache, enc.is_cached(4)))
        if p.message == "embedded":
            assert s.embedded(None, 4)  # served from memory meanwhile: a decode needs no encoder call
    assert [m for m, _, _ in steps] == ["embedding", "embedded", "stored"]
    assert steps[1] == ("embedded", False, True)  # not written yet, but there
    assert enc.key(4) in enc.cache and not enc._fresh and not enc._unstored
    closed = s.embed_slice_steps(None, 5)
    for p in closed:
        if p.message == "embedded":
            break
    closed.close()  # a consumer that stops early still gets the slice written
    assert enc.key(5) in enc.cache and not enc._unstored
