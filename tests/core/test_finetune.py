"""Few-shot training: training data, the trainer generator, head files."""

from __future__ import annotations

import dataclasses
import pickle
import threading

import numpy as np
import pytest
import torch

from napari_medsam.core.build import load_model
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import Cancelled, CheckpointError, HeadMismatchError, InvalidImageError
from napari_medsam.core.finetune import (
    TrainParams,
    _augment,
    collect_training_data,
    fine_tune,
    load_head,
    read_head_meta,
    save_head,
    segmentation_loss,
)
from napari_medsam.core.infer import predict_slices
from napari_medsam.core.progress import drain
from tests._helpers import drain_steps, two_structures

SHAPE = (7, 33, 35)  # odd sizes; slices along axis 0 are 33 x 35
FAST = {"epochs": 3, "batch_size": 2, "patience": 0}


def make_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return two_structures(SHAPE, seed=seed)


@pytest.fixture(scope="module")
def volume():
    return make_volume()


@pytest.fixture(scope="module")
def encoder(loaded, volume):
    return VolumeEncoder(loaded, volume[0], axis=0)


@pytest.fixture(scope="module")
def data(encoder, volume):
    sparse = np.zeros_like(volume[1])
    sparse[[1, 4]] = volume[1][[1, 4]]
    return drain(collect_training_data(encoder, sparse))


@pytest.fixture(scope="module")
def trained(data, loaded):
    return drain(fine_tune(data, TrainParams(head="linear", **FAST), loaded=loaded, class_names=("a", "b")))


# ---------------------------------------------------------------------- training data


def test_collect_training_data(data, encoder, loaded):
    assert data.slices == (1, 4)  # the labelled slices, by default
    assert data.class_ids == (2, 5)
    side = loaded.spec.low_res_size
    assert data.embeddings.shape == (2, *loaded.spec.embedding_shape)
    assert data.embeddings.dtype == np.float16
    assert data.images.shape == (2, 3, loaded.spec.input_size, loaded.spec.input_size)
    assert data.targets.shape == (2, 3, side, side)
    total = data.targets.sum(1)
    tf = encoder.transform()
    h, w = (round(r * side / tf.input_size) for r in tf.resized)
    np.testing.assert_allclose(total[:, : h - 1, : w - 1], 1.0, atol=1e-5)  # inside the image: fractions sum to 1
    assert h < side and total[:, h + 1:].max() == 0  # padding rows: ignored
    assert all(encoder.is_cached(i) for i in (1, 4))


def test_collect_checks_labels(encoder, volume):
    lab = volume[1]
    with pytest.raises(InvalidImageError, match="shape"):
        drain(collect_training_data(encoder, lab[:, :-1]))
    with pytest.raises(InvalidImageError, match="integer"):
        drain(collect_training_data(encoder, lab.astype(np.float32)))
    with pytest.raises(InvalidImageError, match="empty"):
        drain(collect_training_data(encoder, np.zeros_like(lab)))
    with pytest.raises(InvalidImageError, match="outside"):
        drain(collect_training_data(encoder, lab, [0, 7]))
    explicit = drain(collect_training_data(encoder, lab, [3], class_ids=[5]))
    assert explicit.slices == (3,) and explicit.class_ids == (5,)


def test_loss_ignores_padding():
    target = torch.zeros(1, 3, 8, 8)
    target[:, 1, :, :4] = 1.0
    target[:, 0, :4, 4:] = 1.0  # rows 4+ of columns 4+ are padding
    logits = torch.randn(1, 3, 8, 8)
    other = logits.clone()
    other[..., 4:, 4:] = 100 * torch.randn(1, 3, 4, 4)
    assert torch.allclose(segmentation_loss(logits, target), segmentation_loss(other, target))


def test_augmentation_keeps_embeddings_images_and_labels_aligned():
    gen = torch.Generator().manual_seed(3)
    cells = torch.arange(6 * 6, dtype=torch.float32).reshape(1, 6, 6)  # a distinct value per cell
    emb = cells.repeat(2, 1, 1)
    img = cells.repeat_interleave(2, -1).repeat_interleave(2, -2).repeat(3, 1, 1)  # 2 px per cell
    tgt = cells.repeat_interleave(4, -1).repeat_interleave(4, -2)  # 4 px per cell
    for _ in range(10):
        e, i, t = _augment(emb, img, tgt, (5, 4), 2, gen)
        assert torch.equal(i[0, ::2, ::2], e[0]) and torch.equal(t[0, ::4, ::4], e[0])
        assert torch.equal(t[0, 1::4, 3::4], e[0])


# ---------------------------------------------------------------------- training


def test_training_yields_progress_and_returns_a_head(trained, data, loaded):
    progress, head = drain_steps(fine_tune(data, TrainParams(head="linear", **FAST), loaded=loaded))
    assert [p.step for p in progress] == list(range(1, 4))
    assert all({"loss", "elapsed", "epoch"} <= set(p.info) for p in progress)
    meta = head.meta
    assert meta.kind == "linear" and meta.class_ids == (2, 5) and meta.num_classes == 3
    assert meta.backbone == "test_tiny_lite" and meta.training_slices == (1, 4)
    assert meta.history["steps"] == 3
    assert isinstance(meta.history["final_loss"], float)  # 3 steps: fewer than one plateau check
    assert not any(p.requires_grad for p in head.module.parameters())
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert trained.meta.class_names == ("a", "b")


def test_training_learns(data, loaded):
    gen = fine_tune(data, TrainParams(head="linear", epochs=40, batch_size=2, patience=0, augment=False, crop=0),
                    loaded=loaded)
    losses = []
    while True:
        try:
            losses.append(next(gen).info["loss"])
        except StopIteration:
            break
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_crop_margin_reaches_the_edges_more_often():
    # 64-cell grid, 24-cell windows: starts 0..40. Without margin the first row is drawn 1 time in 41;
    # with a margin of 12 cells, 13 in 65 (clamped draws), and every window stays inside the grid
    from napari_medsam.core.finetune import _crop

    emb, tgt = torch.zeros(2, 64, 64), torch.zeros(3, 256, 256)

    def starts(margin, seed=0, n=2000):
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            e, _img, t, rc = _crop(emb, None, tgt, (64, 60), 24, gen, margin)
            assert e.shape[-2:] == (24, 24) and t.shape[-2:] == (96, 96)
            out.append(rc)
        return np.asarray(out)

    plain, edged = starts(0), starts(12)
    assert plain.min() == 0 and plain[:, 0].max() == 40 and plain[:, 1].max() == 36  # cols: 60 valid cells
    assert edged.min() == 0 and edged[:, 0].max() == 40 and edged[:, 1].max() == 36
    at_edge = lambda s: float(np.mean((s[:, 0] == 0) | (s[:, 0] == 40)))  # noqa: E731
    assert at_edge(plain) < 0.08  # about 2 / 41
    assert 0.33 < at_edge(edged) < 0.47  # about 26 / 65
    # margin 0 is the old sampler (one uniform draw of 0..hi per axis): the same windows for the same seed
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [_crop(emb, None, tgt, (64, 60), 24, gen_a, 0)[3] for _ in range(20)]
    b = [(int(torch.randint(0, 41, (1,), generator=gen_b)), int(torch.randint(0, 37, (1,), generator=gen_b)))
         for _ in range(20)]
    assert a == b


@pytest.mark.parametrize(("crop", "expected"), [(None, 6), (10, 10), (0, None)])
def test_training_windows(data, loaded, monkeypatch, crop, expected):
    # default: windows of 3/8 of the grid side (6 of the tiny model's 16 cells), two per slice
    import napari_medsam.core.finetune as ft

    seen = []
    real = ft._crop

    def spy(emb, img, tgt, valid, size, gen, *rest):
        out = real(emb, img, tgt, valid, size, gen, *rest)
        seen.append((size, tuple(out[0].shape[-2:]), tuple(out[2].shape[-2:])))
        return out

    monkeypatch.setattr(ft, "_crop", spy)
    params = TrainParams(head="cnn", head_config={"width": 16}, crop=crop, epochs=1, batch_size=2, patience=0)
    drain(fine_tune(data, params, loaded=loaded))
    side = loaded.spec.low_res_size // loaded.spec.embedding_shape[1]
    if expected is None:
        assert seen == []
    else:
        assert len(seen) == 2 * len(data)
        assert all(s == (expected, (expected, expected), (expected * side, expected * side)) for s in seen)


@pytest.mark.parametrize(("check_steps", "stop_at"), [(10, 30), (1, 7)])
def test_plateau_rule_looks_at_check_steps(data, loaded, check_steps, stop_at):
    # lr 0: a flat loss. 2 slices, batch 2: one step per epoch. patience 4: lr cut after a check
    # that leaves 2+ epochs without improvement, stop after the next such check
    params = TrainParams(head="linear", lr=0.0, epochs=100, batch_size=2, patience=4, augment=False, crop=0,
                         check_steps=check_steps)
    head = drain(fine_tune(data, params, loaded=loaded))
    assert head.meta.history["stopped"] == "plateau"
    assert head.meta.history["steps"] == stop_at


def test_training_is_reproducible(data, loaded):
    def run(seed):
        params = TrainParams(head="cnn", head_config={"width": 16}, seed=seed, **FAST)
        return drain(fine_tune(data, params, loaded=loaded)).module.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cancel_with_an_event(data, loaded):
    cancel = threading.Event()
    gen = fine_tune(data, TrainParams(head="linear", **FAST), loaded=loaded, cancel=cancel)
    next(gen)
    cancel.set()
    with pytest.raises(Cancelled):
        next(gen)


def test_close_stops_and_restores_threads(data, loaded):
    before = torch.get_num_threads()
    gen = fine_tune(data, TrainParams(head="linear", threads=1, **FAST), loaded=loaded)
    next(gen)
    assert torch.get_num_threads() == 1
    gen.close()
    assert torch.get_num_threads() == before


def test_continue_training_from_a_head(trained, data, encoder, volume, loaded):
    before = {k: v.clone() for k, v in trained.module.state_dict().items()}
    more = drain(collect_training_data(encoder, volume[1], [5], class_ids=[5]))  # a subset of the classes
    again = drain(fine_tune(more, TrainParams(**FAST), loaded=loaded, init=trained))
    assert again.meta.kind == "linear"  # the family of the head continued, whatever params.head says
    assert again.meta.class_ids == (2, 5) and again.meta.class_names == ("a", "b")
    assert again.meta.training_slices == (1, 4, 5)
    assert all(torch.equal(before[k], v) for k, v in trained.module.state_dict().items())



@pytest.mark.parametrize("kind", ["linear", "cnn", "autosam"])
def test_continue_training_with_a_new_class_grows_the_head(kind, data, encoder, volume, loaded):
    first = drain(fine_tune(data, TrainParams(head=kind, **FAST), loaded=loaded, class_names=("a", "b")))
    before = {k: v.clone() for k, v in first.module.state_dict().items()}
    lab = volume[1].copy()
    lab[5, 0:3, 0:6] = 7  # a class the first head never saw
    more = drain(collect_training_data(encoder, lab, [5]))
    grown = drain(fine_tune(more, TrainParams(epochs=1, batch_size=1, patience=0, lr=1e-12, warmup_steps=1),
                            loaded=loaded, init=first))
    assert grown.meta.class_ids == (2, 5, 7) and grown.meta.num_classes == 4
    assert grown.meta.class_names == ("a", "b", "class 7")
    assert all(torch.equal(before[k], v) for k, v in first.module.state_dict().items())  # caller's head intact
    # with a vanishing learning rate, the old classes' weights are the old head's
    state = grown.module.state_dict()
    for k, v in before.items():
        w = state[k]
        old = w if w.shape == v.shape else w[:v.shape[0]]
        assert torch.allclose(old, v, atol=1e-6), k
    res = drain(predict_slices(encoder, grown, slices=[5]))
    assert res.class_ids == (2, 5, 7)


def test_training_data_from_another_model_is_refused(data):
    other = load_model("test_tiny_vit", device="cpu", precision="fp32")
    with pytest.raises(HeadMismatchError, match="test_tiny_lite"):
        drain(fine_tune(data, TrainParams(head="linear", **FAST), loaded=other))


# ---------------------------------------------------------------------- head files


@pytest.mark.parametrize("kind", ["cnn", "autosam"])
def test_head_file_round_trip(tmp_path, data, loaded, kind):
    config = {"width": 16, "image_skip": True} if kind == "cnn" else {}
    head = drain(fine_tune(data, TrainParams(head=kind, head_config=config, **FAST), loaded=loaded,
                           class_names=("a", "b")))
    path = save_head(tmp_path / "h.pt", head)
    assert [p.name for p in tmp_path.iterdir()] == ["h.pt"]  # one file, no temporary left
    meta = read_head_meta(path)
    assert meta == head.meta
    assert meta.preprocess == data.preprocess and meta.version and meta.intensity["mode"]
    for back in (load_head(path, loaded=loaded), load_head(path)):
        assert back.meta == head.meta
        emb = torch.from_numpy(data.embeddings[:1].astype(np.float32))
        img = torch.from_numpy(data.images[:1])
        with torch.no_grad():
            assert torch.equal(back.module(emb, img), head.module(emb, img))


def test_head_for_another_backbone_is_refused(tmp_path, trained):
    path = save_head(tmp_path / "h.pt", trained)
    other = load_model("test_tiny_vit", device="cpu", precision="fp32")
    with pytest.raises(HeadMismatchError, match="test_tiny_lite"):
        load_head(path, loaded=other)
    same_name = dataclasses.replace(other, spec=trained_spec(), weights_hash="0" * 64)
    with pytest.raises(HeadMismatchError, match="weights"):
        load_head(path, loaded=same_name)


def trained_spec():
    from napari_medsam.core.registry import get_spec

    return get_spec("test_tiny_lite")


class _Boom:
    ran = False

    def __reduce__(self):
        return (_set_ran, ())


def _set_ran():
    _Boom.ran = True
    return "pwned"


def test_loading_never_unpickles_code(tmp_path, trained):
    path = save_head(tmp_path / "h.pt", trained)
    payload = torch.load(path, weights_only=True)
    payload["meta"] = _Boom()
    evil = tmp_path / "evil.pt"
    torch.save(payload, evil)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_head(evil)
    assert not _Boom.ran
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_head(junk)
    torch.save({"state": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a napari-medsam head"):
        load_head(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_head(tmp_path / "missing.pt")
