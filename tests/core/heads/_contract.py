"""What every self-contained head must satisfy, shared by the per-head test files.

Each helper takes the tiny model, a head family and its options; the head files call them on
their own configurations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import HeadMismatchError
from napari_medsam.core.finetune import TrainParams, collect_training_data, fine_tune, load_head, save_head
from napari_medsam.core.heads import build_head
from napari_medsam.core.infer import predict_slices
from napari_medsam.core.progress import drain
from tests._helpers import drain_steps, two_structures

K = 4  # background + 3 classes: an odd head width
SHAPE = (6, 33, 35)  # odd in-plane sizes; slices along axis 0


def volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic volume with two structures of distinct intensity (label values 2 and 5)."""
    return two_structures(SHAPE, seed=seed)


def training_data(loaded):
    vol, lab = volume()
    enc = VolumeEncoder(loaded, vol, axis=0)
    sparse = np.zeros_like(lab)
    sparse[[1, 4]] = lab[[1, 4]]
    return enc, drain(collect_training_data(enc, sparse))


def check_gradients(loaded, kind: str, config: dict) -> None:
    """Every head parameter gets a finite non-zero gradient from the head's own loss; no encoder parameter does.

    Checked twice: on whole grids and on windows placed with ``origin`` (as the trainer feeds them).
    """
    spec = loaded.spec
    h = spec.embedding_shape[1]
    side = spec.low_res_size
    scale = side // h
    win = h // 2
    for origin in (None, torch.tensor([[1, 2], [h - win, 0]])):
        head = build_head(kind, num_classes=K, loaded=loaded, **config)
        image = torch.rand(2, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0))
        emb = loaded.model.image_encoder(image)  # through the frozen encoder, autograd on
        target = torch.softmax(torch.randn(2, K, side, side, generator=torch.Generator().manual_seed(1)), dim=1)
        target[:, 1:] = (target[:, 1:] > 0.3).float()  # some patches hold each class, some not
        target[:, 0] = (1 - target[:, 1:].sum(1)).clamp_min(0)
        if origin is not None:
            emb = torch.stack([emb[i, :, r:r + win, c:c + win] for i, (r, c) in enumerate(origin.tolist())])
            target = torch.stack([target[i, :, r * scale:(r + win) * scale, c * scale:(c + win) * scale]
                                  for i, (r, c) in enumerate(origin.tolist())])
        out = head.training_forward(emb, image if origin is None else None, origin=origin)
        head.loss(out, target, 0.5).backward()
        assert_head_gradients(head, loaded, f"{kind} {config}")


def assert_head_gradients(head, loaded, what: str) -> None:
    """After a backward pass: every parameter of ``head`` has a finite non-zero gradient, and no
    parameter of the frozen ``loaded`` model has one."""
    for name, p in head.named_parameters():
        assert p.requires_grad, name
        assert p.grad is not None, f"{what}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{what}: {name} got a zero gradient"
    for name, p in loaded.model.named_parameters():
        assert not p.requires_grad and p.grad is None, f"encoder parameter {name} got a gradient"


def check_training_lowers_the_loss(loaded, data, kind: str, config: dict) -> None:
    # whole slices, no shifts: the tiny random backbone's windows are too small to learn from in 40 steps
    params = TrainParams(head=kind, head_config=config, epochs=40, batch_size=2, patience=0, seed=0, lr=3e-3,
                         crop=0, augment=False)
    steps, head = drain_steps(fine_tune(data, params, loaded=loaded))
    losses = [p.info["loss"] for p in steps]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), (losses[:5], losses[-5:])
    return head


def check_round_trip_and_refusal(tmp_path, loaded, other, encoder, head) -> None:
    """Save/load gives identical predictions; another backbone is refused at load and at predict."""
    path = save_head(tmp_path / "h.pt", head)
    emb = torch.randn(2, *loaded.spec.embedding_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = head.module(emb)
        for back in (load_head(path, loaded=loaded), load_head(path)):
            assert back.meta == head.meta
            assert torch.equal(back.module(emb), want)
    res = drain(predict_slices(encoder, load_head(path, loaded=loaded), slices=[0, 2, 5]))
    assert res.labels.shape == SHAPE and set(np.unique(res.labels)) <= {0, 2, 5}
    with pytest.raises(HeadMismatchError, match=loaded.name):
        load_head(path, loaded=other)
    vol, _ = volume()
    with pytest.raises(HeadMismatchError, match=loaded.name):
        drain(predict_slices(VolumeEncoder(other, vol, axis=0), head, slices=[0]))


def check_windows_are_placed(monkeypatch, loaded, data, cls) -> None:
    """The trainer feeds a positional head windows of the grid together with where each one lies."""
    seen = []
    real = cls.training_forward

    def spy(self, embedding, image=None, *, origin=None):
        seen.append((tuple(embedding.shape), None if origin is None else origin.tolist()))
        return real(self, embedding, image, origin=origin)

    monkeypatch.setattr(cls, "training_forward", spy)
    drain(fine_tune(data, TrainParams(head=cls.kind, epochs=2, batch_size=2, patience=0), loaded=loaded))
    h = loaded.spec.embedding_shape[1]
    win = (3 * h) // 8
    assert len(seen) == 2
    for shape, origin in seen:
        assert shape[-2:] == (win, win) and origin is not None and len(origin) == shape[0] == 4
        assert all(0 <= r <= h - win and 0 <= c <= h - win for r, c in origin)
    assert len({tuple(o) for _, origin in seen for o in origin}) > 1


def save_as_old_head_file(path, module, loaded, *, drop: str):
    """Write ``module`` as a head file from before option ``drop`` existed (its config lacks it)."""
    from napari_medsam.core.finetune import HEAD_FORMAT, HeadMeta
    from napari_medsam.core.tensorfile import save_tensor_file

    n = module.num_classes
    cfg = {k: v for k, v in module.config.items() if k != drop}
    ids = tuple(range(1, n))
    meta = HeadMeta(kind=module.kind, config=cfg, num_classes=n, class_ids=ids,
                    class_names=tuple(f"c{i}" for i in ids), backbone=loaded.name,
                    weights_hash=loaded.weights_hash, compute_id=loaded.compute_id, preprocess="",
                    intensity={}, axis=0, embedding_shape=tuple(loaded.spec.embedding_shape),
                    input_size=int(loaded.spec.input_size), training_slices=(0,))
    return save_tensor_file(path, {"format": HEAD_FORMAT, "meta": meta.to_json(), "state": module.state_dict()})
