"""Few-shot training of a prompt-free head on frozen embeddings, and the one-file head format.

The recipe is AutoSAM's (Hu et al. 2023): freeze the image encoder, embed the few slices a user
labelled (through the embedding cache, so nothing is computed twice), and train a light head
(:mod:`napari_medsam.core.heads`) with cross-entropy plus Dice on a ``K``-way softmax (background
is class 0). The trained head then segments every other slice with no prompt
(:func:`napari_medsam.core.infer.predict_slices`).

Long work is a generator: :func:`collect_training_data` and :func:`fine_tune` yield
:class:`~napari_medsam.core.progress.Progress` and return their result; they stop between steps
when a ``threading.Event`` is set (raising :class:`~napari_medsam.core.errors.Cancelled`) or when
the consumer closes the generator. Nothing here touches a GUI.

A head file is ONE ``torch.save`` file holding a dict of plain types: ``format`` (str), ``meta``
(a JSON string: :class:`HeadMeta`) and ``state`` (a dict of tensors). It loads with
``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .errors import Cancelled, CheckpointError, HeadMismatchError, InvalidImageError, MedSamError
from .preprocess import Intensity, SliceTransform
from .progress import Progress, ProgressGen
from .tensorfile import JsonMeta

HEAD_FORMAT = "napari-medsam-head/1"


def default_threads() -> int:
    """Torch threads for training by default: every core but one (left to the GUI), at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class TrainParams:
    """How a head is trained.

    ``head``: family in :data:`~napari_medsam.core.heads.HEADS` (ignored when continuing from
    ``init``, whose family and options are kept); ``head_config``: the family's options.
    A step trains on ``min(batch_size, N)`` of the N labelled slices; an epoch is
    ``ceil(N / batch_size)`` steps. ``epochs``: the most epochs (None: as many as fit in
    ``max_steps`` steps, so that one slice or fifty cost about the same). Training stops earlier
    when the epoch loss (smoothed) has not improved by ``min_delta`` (relative) for ``patience``
    epochs (0: never), after lowering the learning rate 3x once ``patience // 2`` epochs went by
    without improvement. That rule looks at the mean loss of at least ``check_steps`` steps
    (whole epochs): with one to a few labelled slices an epoch is one step on random windows,
    whose loss is too noisy to tell a plateau (1: every epoch, as before).
    ``lr``: AdamW learning rate (None: the head's default), warmed up
    linearly over ``warmup_steps``.
    ``augment``: random shifts of up to ``max_shift`` embedding cells, plus random flips of both
    in-plane axes when ``flip`` (off by default: the embedding of a flipped image is not the
    flipped embedding, so flipped grids are features the encoder never produces), applied alike
    to embeddings, images and labels. ``crop``: fully convolutional heads train on two random
    windows of ``crop`` x ``crop`` cells per slice (None: 3/8 of the grid side, 24 of a 64-cell
    grid; 0: whole slices). The windows are much larger than what a head's convolutions see
    (a few cells), so they do not limit what it can learn; smaller windows give a few slices more
    distinct samples per step and cost less (on the MNI152 benchmark 24-cell windows beat 32-cell
    ones at k = 1 and 3 labelled slices, in both the coronal and the axial plane, for ~0.6x the compute).
    ``crop_margin``: a window's start is drawn uniformly from ``-m .. hi + m`` cells and clamped to
    ``0 .. hi`` (``m`` = ``crop_margin`` x the window side, ``hi`` the last start inside the image's
    area), so the windows touch each edge of the grid more often: with ``m = 0`` (the default) a
    24-cell window reaches a 64-cell grid's first row in 1 of 41 draws, with 0.5 in 13 of 65.
    ``threads``: torch threads for the thread that runs the training (None: all cores but one;
    0: leave torch's setting alone); see :func:`fine_tune` for what this changes.
    ``precision``: the autocast of the head's forward pass (:func:`~napari_medsam.core.device.head_precision`;
    ``auto``: bf16 where the loaded model runs bf16, i.e. a GPU with bf16 or a CPU with native bf16,
    and the head family's training was checked in bf16 (``Head.bf16_training``), else fp32; ``bf16``
    asks for it); the loss and the weights stay fp32. The head file's ``history["precision"]`` and
    every progress's ``info["precision"]`` say which ran.
    """

    head: str = "cnn"
    head_config: Mapping[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    max_steps: int = 150
    lr: float | None = None
    batch_size: int = 4
    seed: int = 0
    augment: bool = True
    max_shift: int = 2
    flip: bool = False
    patience: int = 15
    min_delta: float = 0.01
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    warmup_steps: int = 10
    crop: int | None = None
    threads: int | None = None
    check_steps: int = 10
    crop_margin: float = 0.0
    precision: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["head_config"] = dict(self.head_config)
        return d


@dataclass(frozen=True, eq=False)
class TrainingData:
    """Embeddings and labels of the training slices, in the model frame.

    ``embeddings``: ``(N, C, h, w)`` float16 as cached; ``images``: ``(N, 3, S, S)`` float32 model
    inputs (for heads that use the image); ``targets``: ``(N, K, L, L)`` float32 fraction of each
    class per pixel of the decoder's low-res frame (``L = 4h``), channel 0 background, all zero
    on the padding; ``class_ids``: the label value of classes ``1..K-1``. The other fields name
    what the embeddings were computed from (checked against the model a head is trained with).
    """

    embeddings: np.ndarray
    images: np.ndarray
    targets: np.ndarray
    slices: tuple[int, ...]
    class_ids: tuple[int, ...]
    axis: int
    transform: SliceTransform
    model: str
    weights_hash: str
    compute_id: str
    preprocess: str
    intensity: Intensity
    content_hash: str

    @property
    def num_classes(self) -> int:
        return len(self.class_ids) + 1

    def __len__(self) -> int:
        return len(self.slices)


@dataclass(frozen=True)
class HeadMeta(JsonMeta):
    """Everything a head file says besides its weights (stored as JSON)."""

    kind: str
    config: dict[str, Any]
    num_classes: int
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    backbone: str
    weights_hash: str
    compute_id: str
    preprocess: str
    intensity: dict[str, Any]
    axis: int
    embedding_shape: tuple[int, int, int]
    input_size: int
    training_slices: tuple[int, ...]
    training_image: str = ""
    adapter: str = ""  # the encoder adapters' digest the embeddings came from ("" = the plain encoder)
    train_params: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    version: str = __version__
    created: str = ""

    _TUPLES = ("class_ids", "class_names", "embedding_shape", "training_slices")

    def intensity_mapping(self) -> Intensity:
        return Intensity(**self.intensity)

    def backbone_text(self) -> str:
        return f"{self.backbone!r} (weights sha256 {self.weights_hash[:12]}...)"


@dataclass
class TrainedHead:
    """A trained head module (in eval mode, on the model's device) and its metadata."""

    module: Any
    meta: HeadMeta

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def class_ids(self) -> tuple[int, ...]:
        return self.meta.class_ids

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.meta.class_names


# ------------------------------------------------------------------------------------------------
# training data


def _labels_slice(labels: Any, axis: int, index: int, is_3d: bool) -> np.ndarray:
    if not is_3d:
        return np.asarray(labels[...])
    key: list[Any] = [slice(None)] * 3
    key[axis] = int(index)
    return np.asarray(labels[tuple(key)])


def _check_labels(labels: Any, encoder: Any) -> Any:
    if hasattr(labels, "spatial_shape") and hasattr(labels, "data"):  # an ImageVolume
        labels = labels.data
    if not all(hasattr(labels, a) for a in ("shape", "dtype", "__getitem__")):
        labels = np.asarray(labels)
    dtype = np.dtype(labels.dtype)
    if dtype.kind not in "biu":
        raise InvalidImageError(
            f"labels must be an integer array (0 background, 1..K classes), got dtype {dtype}; "
            "round and cast them first"
        )
    spatial = tuple(int(s) for s in encoder.volume.spatial_shape)
    if tuple(int(s) for s in labels.shape) != spatial:
        raise InvalidImageError(
            f"labels of shape {tuple(labels.shape)} do not match the image's shape {spatial}: "
            "draw the labels on this image (voxel for voxel)"
        )
    return labels


def labelled_slices(labels: Any, axis: int) -> list[int]:
    """Indices along ``axis`` of the slices of a 3D label array that hold any non-zero label."""
    arr = labels
    if arr.ndim == 2:
        return [0] if np.asarray(arr[...]).any() else []
    out = []
    for i in range(int(arr.shape[axis])):
        key: list[Any] = [slice(None)] * 3
        key[axis] = i
        if np.asarray(arr[tuple(key)]).any():
            out.append(i)
    return out


def class_targets(label_slice: np.ndarray, class_ids: Sequence[int], tf: SliceTransform, side: int) -> np.ndarray:
    """``(H, W)`` integer labels -> ``(K, side, side)`` class fractions in the model frame (0 on padding).

    Each class mask is resampled with the slice's own transform (area averaging or linear),
    background is what remains of the image's own area; labels of ids not in ``class_ids`` count
    as background.
    """
    out = np.zeros((len(class_ids) + 1, side, side), dtype=np.float32)
    valid = tf.mask_to_model_lowres(np.ones(label_slice.shape, np.float32), side)
    for k, cid in enumerate(class_ids, start=1):
        out[k] = tf.mask_to_model_lowres(label_slice == cid, side)
    out[0] = np.clip(valid - out[1:].sum(0), 0.0, None)
    return out


def collect_training_data(encoder: Any, labels: Any, slices: Sequence[int] | None = None, *,
                          class_ids: Sequence[int] | None = None,
                          cancel: threading.Event | None = None) -> ProgressGen[TrainingData]:
    """Embed the labelled slices (through the cache) and turn their labels into training targets.

    ``encoder``: a :class:`~napari_medsam.core.encoder.VolumeEncoder`; ``labels``: integer array
    of the image's spatial shape (0 background); ``slices``: indices along the encoder's axis
    (None: every slice holding a label; slices without labels may be listed on purpose, as
    examples of background); ``class_ids``: label values to learn (None: those found on the
    training slices; give a previous head's ``class_ids`` to continue training it).
    Yields the embedding progress; returns a :class:`TrainingData`.
    """
    labels = _check_labels(labels, encoder)
    axis = encoder.axis
    if slices is None:
        chosen = labelled_slices(labels, axis)
        if not chosen:
            raise InvalidImageError("the labels are empty: draw at least one labelled region before training")
    else:
        chosen = sorted({int(s) for s in slices})
        for s in chosen:
            if not 0 <= s < encoder.n_slices:
                raise InvalidImageError(
                    f"training slice {s} is outside 0..{encoder.n_slices - 1} along axis {axis}")
    if not chosen:
        raise InvalidImageError("no training slices given")
    lab = [_labels_slice(labels, axis, s, encoder.is_3d) for s in chosen]
    if class_ids is None:
        found = np.unique(np.concatenate([np.unique(x) for x in lab]))
        ids = tuple(int(v) for v in found if v != 0)
    else:
        ids = tuple(int(v) for v in class_ids)
    if not ids:
        raise InvalidImageError(f"slices {chosen} hold no labels: label at least one class on them")
    if min(ids) < 0:
        raise InvalidImageError(f"labels must be >= 0 (0 background, 1..K classes), found {min(ids)}: "
                                "are these labels, not an image? Renumber them from 1")
    yield from encoder.embed(chosen, cancel=cancel)
    tf = encoder.transform()
    side = encoder.loaded.spec.low_res_size
    embs, imgs, tgts = [], [], []
    for s, lab_s in zip(chosen, lab, strict=True):
        if cancel is not None and cancel.is_set():
            raise Cancelled("collecting training data stopped; embedded slices stay cached")
        embs.append(encoder.get(s)[0].cpu().numpy().astype(np.float16))
        imgs.append(encoder.model_input(s))
        tgts.append(class_targets(lab_s, ids, tf, side))
    loaded = encoder.loaded
    return TrainingData(
        embeddings=np.stack(embs), images=np.stack(imgs).astype(np.float32), targets=np.stack(tgts),
        slices=tuple(chosen), class_ids=ids, axis=axis, transform=tf, model=loaded.name,
        weights_hash=loaded.weights_hash, compute_id=loaded.compute_id, preprocess=encoder._prep,
        intensity=encoder.intensity, content_hash=encoder.content_hash,
    )


# ------------------------------------------------------------------------------------------------
# loss and augmentation


def segmentation_loss(logits: Any, target: Any, *, dice_weight: float = 1.0, smooth: float = 1.0) -> Any:
    """Cross-entropy plus soft Dice of ``(B, K, L, L)`` logits against ``(B, K, L, L)`` class fractions.

    Pixels whose fractions sum to 0 (padding) are ignored. Cross-entropy is averaged over the valid
    pixels; Dice is computed over the whole batch per foreground class and averaged over classes.
    """
    import torch

    weight = target.sum(1)  # (B, L, L): 1 inside the image, 0 on the padding
    logp = torch.log_softmax(logits.float(), dim=1)
    ce = -(target * logp).sum() / weight.sum().clamp_min(1.0)
    if logits.shape[1] < 2 or dice_weight == 0:
        return ce
    p = logp[:, 1:].exp() * weight.unsqueeze(1)
    t = target[:, 1:]
    inter = (p * t).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3))
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return ce + dice_weight * dice.mean()


def _augment(emb: Any, img: Any, tgt: Any, valid_cells: tuple[int, int], max_shift: int, gen: Any,
             flip: bool = True) -> tuple:
    """Random flips (inside the image's own area) and shifts of one sample, the same for all three.

    ``emb`` (C, h, w), ``img`` (3, S, S) or None, ``tgt`` (K, L, L); ``valid_cells``: rows and
    columns of the embedding grid covering the image (the rest is padding).
    """
    import torch

    w = emb.shape[-1]
    ft = tgt.shape[-1] // w  # pixels per embedding cell
    fi = img.shape[-1] // w if img is not None else 1
    for dim, n in ((-2, valid_cells[0]), (-1, valid_cells[1])) if flip else ():
        if bool(torch.rand((), generator=gen) < 0.5):
            emb = _flip_prefix(emb, dim, n)
            tgt = _flip_prefix(tgt, dim, n * ft)
            img = _flip_prefix(img, dim, n * fi) if img is not None else None
    if max_shift > 0:
        dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
        if dy or dx:
            emb = torch.roll(emb, (dy, dx), dims=(-2, -1))
            tgt = torch.roll(tgt, (dy * ft, dx * ft), dims=(-2, -1))
            img = torch.roll(img, (dy * fi, dx * fi), dims=(-2, -1)) if img is not None else None
    return emb, img, tgt


def _crop(emb: Any, img: Any, tgt: Any, valid_cells: tuple[int, int], crop: int, gen: Any,
          margin: int = 0) -> tuple:
    """A random ``crop`` x ``crop``-cell window of one sample (inside the image's area where it fits).

    Each start is drawn uniformly from ``-margin .. hi + margin`` and clamped to ``0 .. hi`` (``hi``:
    the last start inside the image's area), so ``margin`` cells more put the window at an edge.
    Returns the cropped ``(emb, img, tgt)`` and the window's top-left grid cell ``(row, col)``.
    """
    import torch

    h, w = emb.shape[-2:]
    ft = tgt.shape[-1] // w
    fi = img.shape[-1] // w if img is not None else 1
    starts = []
    for n, v in ((h, valid_cells[0]), (w, valid_cells[1])):
        hi = max(0, min(n, max(v, crop)) - crop)
        if margin > 0 and hi > 0:
            start = int(torch.randint(-margin, hi + margin + 1, (1,), generator=gen))
            starts.append(min(hi, max(0, start)))
        else:  # the draw of the sampler without margin (the same windows for the same seed)
            starts.append(int(torch.randint(0, hi + 1, (1,), generator=gen)))
    r, c = starts
    emb = emb[:, r:r + crop, c:c + crop]
    tgt = tgt[:, r * ft:(r + crop) * ft, c * ft:(c + crop) * ft]
    if img is not None:
        img = img[:, r * fi:(r + crop) * fi, c * fi:(c + crop) * fi]
    return emb, img, tgt, (r, c)


def _flip_prefix(x: Any, dim: int, n: int) -> Any:
    """Flip the first ``n`` entries of ``x`` along ``dim`` (the image's area; padding stays put)."""
    import torch

    n = min(n, x.shape[dim])
    head = torch.flip(x.narrow(dim, 0, n), dims=(dim,))
    return torch.cat([head, x.narrow(dim, n, x.shape[dim] - n)], dim=dim)


# ------------------------------------------------------------------------------------------------
# training


def _check_backbone(meta_like: Any, loaded: Any, what: str) -> None:
    if meta_like.model != loaded.name or meta_like.weights_hash != loaded.weights_hash:
        raise HeadMismatchError(
            f"{what} were computed with {meta_like.model!r} (weights sha256 {meta_like.weights_hash[:12]}...) "
            f"but the loaded model is {loaded.name!r} (weights sha256 {loaded.weights_hash[:12]}...); "
            f"load {meta_like.model!r} or collect the training data again"
        )


def _remap_targets(targets: np.ndarray, src_ids: Sequence[int], dst_ids: Sequence[int]) -> np.ndarray:
    """Reorder class channels from ``src_ids`` to ``dst_ids`` (classes missing in src stay 0)."""
    extra = [c for c in src_ids if c not in dst_ids]
    if extra:
        raise HeadMismatchError(
            f"the labels hold classes {extra} that the head being continued does not know "
            f"(it knows {list(dst_ids)}); train a new head for a new set of classes"
        )
    out = np.zeros((targets.shape[0], len(dst_ids) + 1, *targets.shape[2:]), np.float32)
    out[:, 0] = targets[:, 0]
    for j, c in enumerate(src_ids, start=1):
        out[:, dst_ids.index(c) + 1] = targets[:, j]
    return out


class _AdamW:
    """AdamW (decoupled weight decay, bias-corrected moments), the few lines the trainer needs.

    ``torch.optim`` imports ``torch._dynamo`` on first use, which costs 4-10 s and a few hundred MB
    in a napari session; this update is the same arithmetic as ``torch.optim.AdamW``'s defaults.
    """

    def __init__(self, params: Any, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        import torch

        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v, strict=True):
                if p.grad is None:
                    continue
                g = p.grad
                p.mul_(1.0 - self.lr * self.weight_decay)
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                denom = (v / c2).sqrt_().add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / c1)


def _seeded_head(kind: str, num_classes: int, loaded: Any, config: Mapping[str, Any], seed: int) -> Any:
    import torch

    from .heads import build_head

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_head(kind, num_classes=num_classes, loaded=loaded, **dict(config))


def _grown_head(old: Any, kind: str, num_classes: int, loaded: Any, config: Mapping[str, Any], seed: int) -> Any:
    """A head for ``num_classes`` classes that starts from ``old`` (fewer classes, same family).

    Every weight of the same shape is copied; a class-indexed weight (output channels, class
    tokens) gets the old classes' rows in its first rows; what only the new classes have (their
    output rows, autosam's hypernetwork per class) keeps its fresh, seeded initialisation.
    """
    import torch

    head = _seeded_head(kind, num_classes, loaded, config, seed)
    own = head.state_dict()
    src = old.state_dict()
    with torch.no_grad():
        for k, v in own.items():
            w = src.get(k)
            if w is None:
                continue
            if w.shape == v.shape:
                v.copy_(w)
            elif w.dim() == v.dim() and w.shape[1:] == v.shape[1:] and w.shape[0] < v.shape[0]:
                v[:w.shape[0]].copy_(w)
    head.load_state_dict(own)
    return head


def fine_tune(data: TrainingData, params: TrainParams = TrainParams(), *, loaded: Any,
              class_names: Sequence[str] | None = None, init: TrainedHead | None = None,
              cancel: threading.Event | None = None) -> ProgressGen[TrainedHead]:
    """Train a head on ``data``; yield :class:`Progress` per step; return a :class:`TrainedHead`.

    ``loaded``: the backbone the embeddings came from (checked). ``class_names``: one name per
    class id (default ``"class <id>"``). ``init``: a previous head to continue training (the
    active-learning loop: correct its predictions, add the slices, train on); its family, options
    and classes are kept and the caller's head is not modified. Classes in ``data`` that ``init``
    does not know are added after its own (the head grows: see :func:`_grown_head`); their names
    come from ``class_names`` when it names every class, else ``"class <id>"``.

    Each progress carries ``info = {"loss", "epoch", "lr", "elapsed", "precision"}``. Stops between steps when
    ``cancel`` is set (raises :class:`Cancelled`) or the generator is closed. Seeded: the same
    data, parameters and thread count give the same head.

    Threads: ``params.threads`` (default: all cores but one) is applied with
    ``torch.set_num_threads`` in the thread that runs this generator and restored when it ends. With
    PyTorch's OpenMP backend that count is per calling thread (a GUI thread keeps its own), but it
    also becomes the default of threads started later and MKL's global count; a caller that wants
    full control sets ``threads=0`` and manages torch threads itself.
    """
    import torch

    from .device import autocast, head_precision, precision_name

    _check_backbone(data, loaded, "the training embeddings")
    if len(data) == 0:
        raise InvalidImageError("no training slices")
    grow = False
    if init is not None:
        _check_head_backbone(init.meta, loaded)
        kind, config = init.meta.kind, dict(init.meta.config)
        old_ids = tuple(init.meta.class_ids)
        added = tuple(c for c in data.class_ids if c not in old_ids)  # new classes: the head grows
        class_ids = old_ids + added
        grow = bool(added)
        targets = _remap_targets(data.targets, data.class_ids, class_ids)
        if class_names is not None and len(class_names) == len(class_ids):
            names = tuple(class_names)
        else:
            names = tuple(init.meta.class_names) + tuple(f"class {c}" for c in added)
    else:
        kind, config = params.head, dict(params.head_config)
        class_ids = tuple(data.class_ids)
        targets = data.targets
        names = tuple(class_names) if class_names is not None else tuple(f"class {c}" for c in class_ids)
    if len(names) != len(class_ids):
        raise MedSamError(f"{len(names)} class names for {len(class_ids)} classes ({list(class_ids)})")
    if (params.epochs is not None and params.epochs < 1) or params.batch_size < 1 or params.max_steps < 1:
        raise MedSamError("epochs, max_steps and batch_size must be at least 1")

    threads = default_threads() if params.threads is None else int(params.threads)
    prev_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        if init is not None and grow:
            head = _grown_head(init.module, kind, len(class_ids) + 1, loaded, config, params.seed)
        elif init is not None:
            head = copy.deepcopy(init.module)
        else:
            head = _seeded_head(kind, len(class_ids) + 1, loaded, config, params.seed)
        dev = loaded.device
        dtype = head_precision(params.precision, loaded, head, training=True)
        prec = precision_name(dtype)
        head.to(dev).train()
        for p in head.parameters():
            p.requires_grad_(True)
        lr = float(params.lr if params.lr is not None else head.default_lr)
        opt = _AdamW(head.parameters(), lr=lr, weight_decay=params.weight_decay)
        emb_all = torch.from_numpy(np.ascontiguousarray(data.embeddings)).to(dev)  # (N, C, h, w) fp16
        img_all = torch.from_numpy(np.ascontiguousarray(data.images)).to(dev) if head.uses_image else None
        tgt_all = torch.from_numpy(np.ascontiguousarray(targets)).to(dev)  # (N, K, L, L)
        n = len(data)
        bs = min(params.batch_size, n)
        steps_per_epoch = max(1, math.ceil(n / bs))
        epochs = params.epochs if params.epochs is not None else max(1, math.ceil(params.max_steps / steps_per_epoch))
        total = epochs * steps_per_epoch
        gen = torch.Generator().manual_seed(params.seed)
        tf = data.transform
        c, h, w = data.embeddings.shape[1:]
        valid = (math.ceil(tf.resized[0] * h / tf.input_size), math.ceil(tf.resized[1] * w / tf.input_size))
        crop = 0
        if getattr(head, "crops", False):
            crop = (3 * h) // 8 if params.crop is None else int(params.crop)
            crop = crop if 0 < crop < min(h, w) else 0
        margin = int(round(params.crop_margin * crop))
        t0 = time.perf_counter()
        step = 0
        best, ema, wait, reduced = math.inf, None, 0, False
        # the stopping rule looks at the loss of whole epochs averaged over >= check_steps steps
        check = max(1, math.ceil(params.check_steps / steps_per_epoch))
        run_loss, run_steps = 0.0, 0
        stopped = "epochs"
        epoch = 0
        for epoch in range(1, epochs + 1):  # noqa: B007 - read after the loop
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(steps_per_epoch * bs / n))])
            epoch_loss = 0.0
            for s in range(steps_per_epoch):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"training stopped at step {step} of {total}; nothing was saved")
                idx = order[s * bs:(s + 1) * bs]
                emb = emb_all[idx]  # float16 as cached: shifted and cropped first, converted after (the same values)
                img = img_all[idx] if img_all is not None else None
                tgt = tgt_all[idx]
                kw: dict[str, Any] = {}
                if params.augment or crop:
                    parts = [(emb[j], img[j] if img is not None else None, tgt[j]) for j in range(len(idx))]
                    if params.augment:
                        parts = [_augment(*p, valid, params.max_shift, gen, params.flip) for p in parts]
                    if crop:  # two windows per slice: about the pixels of one full slice
                        parts = [_crop(*p, valid, crop, gen, margin) for p in parts for _ in range(2)]
                        if getattr(head, "positional", False):  # it places each window on its positional encoding
                            kw["origin"] = torch.tensor([p[3] for p in parts], device=dev)
                    emb = torch.stack([p[0] for p in parts])
                    img = torch.stack([p[1] for p in parts]) if img is not None else None
                    tgt = torch.stack([p[2] for p in parts])
                emb = emb.float()
                warm = min(1.0, (step + 1) / max(1, params.warmup_steps))
                opt.lr = lr * warm
                # the head's protocol (heads.base.Head): multi-output heads weigh their losses by progress
                with autocast(dev, dtype):  # the forward pass; the loss (in fp32) and the update outside
                    out = head.training_forward(emb, img, **kw)
                loss = head.loss(out, tgt, step / max(1, total - 1), dice_weight=params.dice_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                value = float(loss.detach())
                epoch_loss += value
                yield Progress(step, total, "training", {"loss": value, "epoch": epoch, "lr": lr * warm,
                                                         "elapsed": time.perf_counter() - t0, "precision": prec})
            run_loss, run_steps = run_loss + epoch_loss, run_steps + steps_per_epoch
            if epoch % check:
                continue
            mean_loss, run_loss, run_steps = run_loss / run_steps, 0.0, 0
            ema = mean_loss if ema is None else 0.7 * ema + 0.3 * mean_loss
            if ema < best * (1.0 - params.min_delta):
                best, wait = ema, 0
            else:
                wait += check
            if params.patience > 0:
                if wait >= max(1, params.patience // 2) and not reduced:
                    lr, reduced, wait = lr / 3.0, True, 0
                elif wait >= params.patience:
                    stopped = "plateau"
                    break
        if run_steps:  # epochs after the last check (or fewer epochs than one check) count in the final loss
            mean_loss = run_loss / run_steps
            ema = mean_loss if ema is None else 0.7 * ema + 0.3 * mean_loss
        head.eval()
        for p in head.parameters():
            p.requires_grad_(False)
        seconds = time.perf_counter() - t0
    finally:
        if threads > 0:
            torch.set_num_threads(prev_threads)

    prev_slices = tuple(init.meta.training_slices) if init is not None else ()
    history = {"steps": step, "epochs": epoch, "final_loss": ema, "seconds": round(seconds, 3),
               "stopped": stopped, "n_slices": n, "precision": prec}
    if init is not None:
        history["continued_from"] = dict(init.meta.history)
    meta = HeadMeta(
        kind=kind, config=dict(head.config), num_classes=len(class_ids) + 1, class_ids=class_ids,
        class_names=names, backbone=loaded.name, weights_hash=loaded.weights_hash,
        compute_id=loaded.compute_id, preprocess=data.preprocess, intensity=dataclasses.asdict(data.intensity),
        axis=data.axis, embedding_shape=tuple(int(v) for v in loaded.spec.embedding_shape),
        input_size=int(loaded.spec.input_size),
        training_slices=tuple(sorted(set(prev_slices) | set(data.slices))), training_image=data.content_hash,
        adapter=loaded.adapter_digest, train_params=params.to_dict(), history=history,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return TrainedHead(module=head, meta=meta)


# ------------------------------------------------------------------------------------------------
# head files


def _check_head_backbone(meta: HeadMeta, loaded: Any) -> None:
    if meta.backbone != loaded.name or meta.weights_hash != loaded.weights_hash:
        raise HeadMismatchError(
            f"this head was trained on embeddings of {meta.backbone_text()}, but the loaded model is "
            f"{loaded.name!r} (weights sha256 {loaded.weights_hash[:12]}...): load {meta.backbone!r} "
            f"with the same weights to use it (CLI: --model {meta.backbone})"
        )
    check_head_adapter(meta, getattr(loaded, "adapter_digest", ""))


def check_head_adapter(meta: HeadMeta, have: str) -> None:
    """Refuse a head on embeddings of other encoder adapters than its own (``have``: their digest, "" = none)."""
    if meta.adapter != have:
        if not meta.adapter:
            what = "remove the adapter (CLI: drop --adapter)"
        else:
            what = f"apply the adapter file it was trained with (CLI: --adapter FILE; digest {meta.adapter[:12]}...)"
        raise HeadMismatchError(
            f"this head was trained on embeddings of the {'adapted' if meta.adapter else 'plain'} encoder, but "
            f"the loaded model is {'adapted (' + have[:12] + '...)' if have else 'plain'}: {what}")


def save_head(path: str | os.PathLike, head: TrainedHead) -> Path:
    """Write ``head`` to one file (weights + JSON metadata), atomically; returns the path."""
    from .tensorfile import save_tensor_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in head.module.state_dict().items()}
    return save_tensor_file(path, {"format": HEAD_FORMAT, "meta": head.meta.to_json(), "state": state})


def _check_head_format(p: Path, fmt: Any) -> None:
    if not isinstance(fmt, str) or not fmt.startswith("napari-medsam-head/"):
        raise CheckpointError(f"{p} is not a napari-medsam head file (no {HEAD_FORMAT!r} format marker)")
    if fmt != HEAD_FORMAT:
        raise CheckpointError(f"{p} is a head file of format {fmt!r}; this version reads {HEAD_FORMAT!r}: "
                              "upgrade napari-medsam")


def _read_payload(path: str | os.PathLike) -> tuple[HeadMeta, dict[str, Any]]:
    from .tensorfile import read_tensor_file

    p, payload, state = read_tensor_file(
        path, what="head", written_by="a head saved by `napari-medsam train` / save_head",
        check_format=_check_head_format)
    try:
        meta = HeadMeta.from_json(payload.get("meta", ""))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: the head file's metadata cannot be read ({e})") from e
    return meta, state


def read_head_meta(path: str | os.PathLike) -> HeadMeta:
    """The metadata of a head file (which model, axis, classes, preprocessing), without building it."""
    return _read_payload(path)[0]


def load_head(path: str | os.PathLike, *, loaded: Any = None) -> TrainedHead:
    """Read a head file (``torch.load(weights_only=True)``: no pickled code runs) and rebuild the head.

    With ``loaded`` the head must have been trained on that backbone (same model name and weights
    hash), else :class:`HeadMismatchError` names the one it needs; the module goes to its device.
    Without ``loaded`` the head is rebuilt from the registry's architecture on the CPU.
    Missing or unexpected weights raise :class:`CheckpointError` naming them.
    """
    from .heads import SAVED_DEFAULTS, build_head
    from .registry import get_spec

    meta, state = _read_payload(path)
    if loaded is not None:
        _check_head_backbone(meta, loaded)
        spec = loaded.spec
    else:
        spec = get_spec(meta.backbone)
    if tuple(spec.embedding_shape) != tuple(meta.embedding_shape):
        raise HeadMismatchError(
            f"{path}: the head expects embeddings of shape {tuple(meta.embedding_shape)}, model "
            f"{spec.name!r} gives {tuple(spec.embedding_shape)}")
    config = {**SAVED_DEFAULTS.get(meta.kind, {}), **meta.config}  # options older files did not record
    meta = dataclasses.replace(meta, config=config)  # a warm start continues with the same architecture
    module = build_head(meta.kind, num_classes=meta.num_classes, loaded=spec, **config)
    missing, unexpected = [], []
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path}: the head's weights do not fit a {meta.kind!r} head "
                              f"(missing: {missing[:8]}, unexpected: {unexpected[:8]})")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the head's weights do not fit its architecture: {e}") from e
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if loaded is not None:
        module.to(loaded.device)
    return TrainedHead(module=module, meta=meta)


__all__ = [
    "HEAD_FORMAT", "HeadMeta", "TrainParams", "TrainedHead", "TrainingData", "class_targets",
    "collect_training_data", "default_threads", "fine_tune", "labelled_slices", "load_head",
    "read_head_meta", "save_head", "segmentation_loss",
]
