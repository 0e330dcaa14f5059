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


# ---- zoom: a small box decoded again on the embedding of the window around it ----------------------


@pytest.fixture
def small_object(tmp_path):
    """A session on a 3-slice volume with a small bright blob on slice 1, the tiny model loaded."""
    vol = np.random.default_rng(5).random((3, 120, 100)).astype(np.float32) * 40
    vol[1, 52:60, 44:56] = 200.0
    s = AnnotationSession(cache_dir=tmp_path / "emb", disk_cache=False)
    s.load_model(ModelChoice("test_tiny_lite", device="cpu"))
    s.open_image(vol, axis=0)
    return s


def _count_encoder_calls(monkeypatch):
    from napari_medsam.core import encoder as encoder_mod

    calls = []
    real = encoder_mod.run_encoder

    def counting(loaded, x, *a, **kw):
        calls.append(tuple(np.shape(x)))
        return real(loaded, x, *a, **kw)

    monkeypatch.setattr(encoder_mod, "run_encoder", counting)
    return calls


def test_a_small_box_is_refined_on_its_window(small_object, monkeypatch):
    from napari_medsam.core import zoom
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.segment import segment_slice

    s = small_object
    assert s.zoom == zoom.DEFAULT_CONTEXT
    box = (50.0, 42.0, 62.0, 58.0)
    prompt = Prompt2D.from_box(box)
    req = s.request()
    quick = s.preview(1, prompt)  # the slice is embedded now: the refine embeds only its window
    window = s.zoom_window(req, 1, prompt)
    assert window == zoom.zoom_window(box, (120, 100))
    r0, c0, r1, c1 = window
    assert (r1 - r0, c1 - c0) == (32, 32) and r0 <= 50 and r1 >= 62 and c0 <= 42 and c1 >= 58
    calls = _count_encoder_calls(monkeypatch)
    assert not s.zoom_ready(req, 1, prompt)  # the window is not embedded yet
    steps = []
    gen = s.refine_steps(req, 1, prompt)
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as stop:
        ran = stop.value
    assert ran is True and [p.message for p in steps] == ["zooming", "embedded"]
    assert steps[-1].info["window"] == window and steps[-1].info["gain"] == pytest.approx(120 / 32)
    assert len(calls) == 1  # one encoder call, for the window
    assert s.zoom_ready(req, 1, prompt)
    res = s.refined(req, 1, prompt)
    assert len(calls) == 1  # the remembered window: a decoder call only
    assert res.mask.shape == quick.mask.shape == (120, 100)
    outside = np.ones((120, 100), bool)
    outside[r0:r1, c0:c1] = False
    assert not res.mask[outside].any()
    # the mask of the window cut out as an image of its own (same intensities), pasted back
    crop = VolumeEncoder(s.loaded, s.volume.data[1, r0:r1, c0:c1], intensity=s.encoder(req).intensity)
    own = segment_slice(crop, 0, [Prompt2D.from_box((box[0] - r0, box[1] - c0, box[2] - r0, box[3] - c0))])[0]
    assert own.mask.any()
    np.testing.assert_array_equal(res.mask[r0:r1, c0:c1], own.mask)
    np.testing.assert_array_equal(s.refine(1, prompt).mask, res.mask)  # the script's verb


def test_no_window_for_a_large_box_points_alone_or_zoom_off(small_object, monkeypatch):
    s = small_object
    req = s.request()
    calls = _count_encoder_calls(monkeypatch)
    small = Prompt2D.from_box((50.0, 42.0, 62.0, 58.0))
    for prompt in (Prompt2D.from_box((2.0, 2.0, 118.0, 98.0)),  # a whole-slice box: nothing to gain
                   Prompt2D.from_points([[55, 50]], [1])):      # a click: never zoomed
        assert s.zoom_window(req, 1, prompt) is None
        assert drain_steps(s.refine_steps(req, 1, prompt)) == (["zooming"], False)
        assert s.refined(req, 1, prompt) is None and s.refine(1, prompt) is None
    assert s.zoom_window(req, 1, small) is not None
    s.zoom = None
    assert s.zoom_window(req, 1, small) is None
    assert drain_steps(s.refine_steps(req, 1, small)) == (["zooming"], False)
    assert s.refined(req, 1, small) is None
    assert calls == []
    s.zoom = 4.0  # a wider context: a larger window (4 x the box's 16 px)
    r0, c0, r1, c1 = s.zoom_window(req, 1, small)
    assert (r1 - r0, c1 - c0) == (64, 64)
    s.zoom = 6.0  # 96 px would magnify the 120 px slice less than 1.5 times: no window
    assert s.zoom_window(req, 1, small) is None


def test_the_slice_shape_follows_the_axis():
    from napari_medsam.app.session import EncoderRequest
    from napari_medsam.core.encoder import as_volume

    vol = as_volume(np.zeros((5, 30, 40), np.float32))
    shapes = [AnnotationSession.slice_shape(EncoderRequest(0, 0, vol, axis=a)) for a in (0, 1, 2, -1)]
    assert shapes == [(30, 40), (5, 40), (5, 30), (5, 30)]
    flat = as_volume(np.zeros((30, 40), np.float32))
    assert AnnotationSession.slice_shape(EncoderRequest(0, 0, flat, axis=0)) == (30, 40)


def drain_steps(gen):
    messages = []
    try:
        while True:
            messages.append(next(gen).message)
    except StopIteration as stop:
        return messages, stop.value
