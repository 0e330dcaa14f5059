"""Adapting the image encoder itself: Medical SAM Adapter (Med-SA), SD-Trans, HyP-Adpt and LoRA.

Where the heads of :mod:`~napari_medsam.core.finetune` learn on frozen embeddings, this module puts
small trainable modules inside the encoder (:mod:`~napari_medsam.core.nets.adapters`) and trains
them together with the mask decoder on the user's labelled slices, prompted with boxes simulated
from the labels (each side grown by a random 0..20 px per 1024 px of input, as MedSAM trains).
The backbone stays frozen.

* :func:`inject_adapters` returns a new :class:`~napari_medsam.core.loaded.LoadedModel` with
  adapters (``kind="medsa"``: a bottleneck after every attention and beside every MLP; ``"lora"``:
  low-rank q/v updates), optionally SD-Trans (``sd_trans``: attention along neighbouring slices;
  the encoder then embeds a slice from a stack of ``2 * context + 1``) and HyP-Adpt (``hyp``). The
  frozen weights are shared with the original model, never modified; the decoder is a copy.
  Untrained, every adapter adds exact zeros: embeddings and masks are bit-identical to the plain model's.
* The adapted model's ``variant`` names the adapter and the SHA-256 of its weights, so its
  embeddings are cached apart from the plain model's (and from any other adapter's).
* :func:`train_adapters` is a generator (yields :class:`~napari_medsam.core.progress.Progress`,
  returns a :class:`TrainedAdapter`), stoppable by a ``threading.Event``; seeded.
  :func:`estimate_seconds` times one training step beforehand.
* :func:`save_adapter` / :func:`load_adapter`: one file in the head file layout (``format``, JSON
  ``meta``, tensor ``state``), read with ``torch.load(weights_only=True)``, refused on another backbone.
* For the GUI: :func:`adapter_config` (None for a plain model), :func:`describe_adapter`,
  :func:`base_model` (the plain model an adapted one was made from), :func:`parameter_counts`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .errors import Cancelled, CheckpointError, HeadMismatchError, InvalidImageError, MedSamError
from .loaded import LoadedModel
from .progress import Progress, ProgressGen
from .tensorfile import JsonMeta

ADAPTER_FORMAT = "napari-medsam-adapter/1"
ADAPTER_KINDS = ("medsa", "lora")

__all__ = [
    "ADAPTER_FORMAT", "ADAPTER_KINDS", "AdaptParams", "AdapterConfig", "AdapterMeta", "TrainedAdapter",
    "adapted_encoder", "adapter_config", "base_model", "describe_adapter", "estimate_seconds",
    "inject_adapters", "load_adapter", "parameter_counts", "read_adapter_meta", "save_adapter",
    "train_adapters",
]


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapters go where.

    ``kind``: ``"medsa"`` (bottleneck adapters ``D -> ratio*D -> D``: after each attention with a
    skip, beside each MLP scaled by ``mlp_scale``) or ``"lora"`` (rank-``rank`` updates of q and v).
    ``sd_trans``: SD-Trans depth attention over ``context`` neighbours on each side (through a
    depth adapter in every block). ``hyp``: HyP-Adpt in the mask decoder (bottleneck ``hyp_rank``).
    """

    kind: str = "medsa"
    ratio: float = 0.25
    mlp_scale: float = 0.5
    rank: int = 4
    sd_trans: bool = False
    context: int = 1
    hyp: bool = False
    hyp_rank: int = 16

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise MedSamError(f"unknown adapter {self.kind!r}: use one of {', '.join(ADAPTER_KINDS)}")
        if self.kind == "lora" and self.rank < 1:
            raise MedSamError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0 < self.ratio <= 4:
            raise MedSamError(f"adapter bottleneck ratio must be in (0, 4], got {self.ratio}")
        if self.sd_trans and self.context < 1:
            raise MedSamError(f"SD-Trans needs at least 1 neighbouring slice on each side, got {self.context}")

    @property
    def tag(self) -> str:
        """Short name: ``medsa``, ``lora4``, with ``+sd1`` (SD-Trans, 1 neighbour each side) and ``+hyp``."""
        t = self.kind if self.kind == "medsa" else f"lora{self.rank}"
        if self.sd_trans:
            t += f"+sd{self.context}"
        if self.hyp:
            t += "+hyp"
        return t

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------------------
# injection


def _blocks(encoder: Any) -> list[Any]:
    """The transformer blocks of a SAM ViT or TinyViT encoder (TinyViT's conv stage has none)."""
    from .nets.tiny_vit import TinyViTBlock
    from .nets.vit import Block

    return [m for m in encoder.modules() if isinstance(m, (Block, TinyViTBlock))]


def adapter_config(loaded: LoadedModel) -> AdapterConfig | None:
    """The adapter configuration of an adapted model; None for a plain one."""
    return getattr(loaded.model, "adapter_config", None)


def base_model(loaded: LoadedModel) -> LoadedModel:
    """The plain model an adapted one was made from (``loaded`` itself when it is plain)."""
    return getattr(loaded.model, "adapter_base", None) or loaded


def describe_adapter(loaded: LoadedModel) -> str:
    """One line for the Model dock: which adapter is active (empty for a plain model)."""
    cfg = adapter_config(loaded)
    if cfg is None:
        return ""
    counts = parameter_counts(loaded)
    digest = getattr(loaded.model, "adapter_digest", "")
    return (f"adapter {cfg.tag} ({counts['adapter']:,} adapter + {counts['decoder']:,} decoder parameters"
            f"{', weights ' + digest[:12] if digest else ''})")


def _share_copy(model: Any) -> Any:
    """A copy of ``model`` whose image encoder and prompt encoder share the (frozen) tensors of
    ``model``; the mask decoder is copied (it is trained)."""
    memo: dict[int, Any] = {}
    for part in (model.image_encoder, model.prompt_encoder):
        for t in list(part.parameters()) + list(part.buffers()):
            memo[id(t)] = t
    base = getattr(model, "adapter_base", None)
    if base is not None:
        memo[id(base)] = base
    return copy.deepcopy(model, memo)


def _adapter_names(model: Any) -> list[str]:
    """State-dict names an adapter file holds: the adapters in the encoder and the whole decoder."""
    out = []
    for name in model.state_dict():
        if name.startswith("mask_decoder.") or (
                name.startswith("image_encoder.") and (".adapter." in name or ".lora." in name)):
            out.append(name)
    return out


def adapter_state(loaded: LoadedModel) -> dict[str, Any]:
    """The tensors that make an adapted model differ from its base (CPU copies)."""
    sd = loaded.model.state_dict()
    return {k: sd[k].detach().cpu().contiguous().clone() for k in _adapter_names(loaded.model)}


def _digest(state: Mapping[str, Any], config: AdapterConfig) -> str:
    import torch

    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _with_identity(adapted: LoadedModel, base: LoadedModel, config: AdapterConfig) -> LoadedModel:
    meta = getattr(adapted.device, "type", "") == "meta"  # counting parameters without weights
    digest = "0" * 64 if meta else _digest(adapter_state(adapted), config)
    adapted.model.adapter_digest = digest
    return dataclasses.replace(adapted, variant=f"{base.variant}+{config.tag}:{digest[:16]}")


def inject_adapters(loaded: LoadedModel, config: AdapterConfig = AdapterConfig(), *, seed: int = 0) -> LoadedModel:
    """A new model: ``loaded`` (or its base, when already adapted) with freshly initialised adapters.

    The frozen weights are shared with ``loaded``; the decoder is a copy. The adapters (seeded by
    ``seed``) start at zero output, so the new model computes what ``loaded`` does; its ``variant``
    names the adapter weights. Everything is frozen and in eval mode; :func:`train_adapters` trains it.
    """
    import torch

    from .nets.adapters import BlockAdapter, HypAdapter, LoRAQV, enable_slice_stacks, qkv_layout

    base = base_model(loaded)
    model = _share_copy(base.model)
    enc = model.image_encoder
    blocks = _blocks(enc)
    if not blocks:
        raise MedSamError(f"{base.name}: its encoder has no transformer blocks to adapt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for blk in blocks:
            dim = blk.attn.qkv.in_features if hasattr(blk.attn.qkv, "in_features") else blk.attn.proj.in_features
            medsa = config.kind == "medsa"
            if medsa or config.sd_trans:
                blk.adapter = BlockAdapter(dim, ratio=config.ratio, scale=config.mlp_scale, space=medsa, mlp=medsa,
                                           depth=config.sd_trans)
            if config.kind == "lora":
                blk.attn.lora = LoRAQV(dim, config.rank, heads=blk.attn.num_heads, layout=qkv_layout(blk.attn))
        if config.hyp:
            model.mask_decoder.token_adapter = HypAdapter(model.mask_decoder.transformer_dim, rank=config.hyp_rank)
    if config.sd_trans:
        enc.slice_context = int(config.context)
        enc._adapter_hooks = enable_slice_stacks(enc)
    for name, mod in model.named_modules():
        if name.endswith((".adapter", ".lora", ".token_adapter")):
            mod.to(device=base.device, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.adapter_config = config
    model.adapter_base = base
    return _with_identity(dataclasses.replace(base, model=model), base, config)


def _trainable(model: Any) -> tuple[list[Any], list[Any]]:
    """(adapter parameters, decoder parameters) of an adapted model (HyP-Adpt counts as adapter)."""
    adapters, decoder = [], []
    for name, p in model.named_parameters():
        if name.startswith("mask_decoder.token_adapter."):
            adapters.append(p)
        elif name.startswith("mask_decoder."):
            decoder.append(p)
        elif name.startswith("image_encoder.") and (".adapter." in name or ".lora." in name):
            adapters.append(p)
    return adapters, decoder


def parameter_counts(loaded: LoadedModel) -> dict[str, Any]:
    """Parameter counts: ``encoder`` (frozen backbone encoder), ``adapter`` (trained adapters incl.
    HyP-Adpt), ``decoder`` (the trained mask decoder), ``total`` (whole model incl. adapters),
    ``trainable`` and ``share`` (trainable / total) and ``adapter_share`` (adapters / encoder)."""
    model = loaded.model
    adapters, decoder = _trainable(model)
    n_ad = sum(p.numel() for p in adapters)
    n_dec = sum(p.numel() for p in decoder)
    total = sum(p.numel() for p in model.parameters())
    n_enc = sum(p.numel() for n, p in model.image_encoder.named_parameters()
                if ".adapter." not in n and ".lora." not in n)
    trainable = n_ad + n_dec if adapter_config(loaded) is not None else 0
    return {"encoder": n_enc, "adapter": n_ad, "decoder": n_dec, "total": total, "trainable": trainable,
            "share": trainable / total if total else 0.0, "adapter_share": n_ad / n_enc if n_enc else 0.0}


# ------------------------------------------------------------------------------------------------
# the encoder split at its frozen prefix


def _split_encoder(enc: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """``(prefix, rest)`` with ``rest(prefix(x)) == enc(x)`` for ``(B, 3, S, S)`` inputs.

    ``prefix`` holds no adapter (TinyViT's conv stage; the ViT's patch + position embedding), so
    training computes it once per slice, without autograd.
    """
    from .nets.tiny_vit import TinyViT, pointwise
    from .nets.vit import ImageEncoderViT

    if isinstance(enc, TinyViT):
        def prefix(x: Any) -> Any:
            return enc.layers[0](enc.patch_embed(x.permute(0, 2, 3, 1).contiguous()))

        def rest(t: Any) -> Any:
            for layer in enc.layers[1:]:
                t = layer(t)
            conv1, ln1, conv2, ln2 = enc.neck
            t = ln1.forward_channels_last(pointwise(conv1, t))
            t = ln2.forward_channels_last(pointwise(conv2, t))
            return t.permute(0, 3, 1, 2).contiguous()

        return prefix, rest
    if isinstance(enc, ImageEncoderViT):
        def prefix_vit(x: Any) -> Any:
            return enc.patch_embed(x) + enc.pos_embed

        def rest_vit(t: Any) -> Any:
            for blk in enc.blocks:
                t = blk(t)
            return enc.neck(t.permute(0, 3, 1, 2))

        return prefix_vit, rest_vit
    raise MedSamError(f"adapters are implemented for the SAM ViT and TinyViT encoders, not {type(enc).__name__}")


# ------------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class AdaptParams:
    """How adapters are trained.

    ``steps`` optimiser steps, each on ``batch_size`` labelled slices (every object on them, one
    box each). ``lr``: AdamW rate of the adapters (LoRA, HyP-Adpt), ``decoder_lr`` of the mask
    decoder (0: decoder frozen), both warmed up over ``warmup_steps``. ``box_shift``: the most
    each box side is grown at random, in model-input pixels (None: 20 px per 1024, MedSAM's
    jitter; 5 at LiteMedSAM's 256). Loss: BCE + Dice of the box's mask, plus the squared error of
    the predicted IoU. Precision: fp32 on a CPU (``cpu_bf16``: bf16 autocast, falling back to fp32
    for good when a loss is not finite), bf16 autocast on CUDA where supported.
    ``threads``: torch threads while training (None: all cores but one; 0: leave alone).
    """

    steps: int = 80
    batch_size: int = 2
    lr: float = 1e-3
    decoder_lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 5
    box_shift: float | None = None
    min_area: int = 4
    seed: int = 0
    threads: int | None = None
    cpu_bf16: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AdapterMeta(JsonMeta):
    """Everything an adapter file says besides its weights (stored as JSON)."""

    config: dict[str, Any]
    backbone: str
    weights_hash: str
    base_variant: str
    digest: str
    axis: int = 0
    preprocess: str = ""
    intensity: dict[str, Any] = field(default_factory=dict)
    class_ids: tuple[int, ...] = ()
    training_slices: tuple[int, ...] = ()
    training_image: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    train_params: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    version: str = __version__
    created: str = ""

    _TUPLES = ("class_ids", "training_slices")

    @property
    def adapter(self) -> AdapterConfig:
        return AdapterConfig.from_dict(self.config)


@dataclass
class TrainedAdapter:
    """An adapted model (eval mode, frozen) and its metadata."""

    loaded: LoadedModel
    meta: AdapterMeta


@dataclass
class _Sample:
    slice: int
    prefix: Any                 # (1 or D, ...) frozen prefix activations of the slice (and neighbours)
    boxes: list[tuple[float, float, float, float]]  # tight (r0, c0, r1, c1) per object, original pixels
    targets: Any                # (n_obj, L, L) float 0/1 in the model frame
    valid: Any                  # (L, L) float: 1 on the image, 0 on the padding


def _objects(lab: np.ndarray, ids: Sequence[int], min_area: int) -> list[tuple[int, np.ndarray]]:
    out = []
    for cid in ids:
        m = lab == cid
        if int(m.sum()) >= min_area:
            out.append((int(cid), m))
    return out


def _jittered_boxes(boxes: Sequence[tuple[float, float, float, float]], shape: tuple[int, int],
                    shift_px: tuple[float, float], gen: Any) -> np.ndarray:
    """Each side grown by a random 0..shift (original pixels per axis), clipped to the slice."""
    import torch

    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    u = torch.rand(b.shape, generator=gen).numpy()
    sr, sc = shift_px
    grow = u * np.array([sr, sc, sr, sc], np.float32)
    h, w = shape
    out = b + grow * np.array([-1, -1, 1, 1], np.float32)
    return np.clip(out, 0.0, np.array([h, w, h, w], np.float32))


def _box_loss(logits: Any, iou_pred: Any, target: Any, valid: Any) -> Any:
    """BCE + soft Dice of ``(N, L, L)`` logits inside the image, plus MSE of the predicted IoU."""
    import torch
    import torch.nn.functional as F

    lg = logits.float()
    wsum = valid.sum().clamp_min(1.0) * lg.shape[0]
    bce = F.binary_cross_entropy_with_logits(lg, target, weight=valid.expand_as(lg), reduction="sum") / wsum
    p = torch.sigmoid(lg) * valid
    inter = (p * target).sum((1, 2))
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum((1, 2)) + target.sum((1, 2)) + 1.0)
    with torch.no_grad():
        hard = (lg > 0).float() * valid
        i = (hard * target).sum((1, 2))
        u = (hard + target).clamp_max(1.0).sum((1, 2))
        iou_true = torch.where(u > 0, i / u.clamp_min(1.0), torch.ones_like(u))
    return bce + dice.mean() + F.mse_loss(iou_pred.float(), iou_true)


class _Trainer:
    """One adapted model, its optimisers and the training step (shared by the trainer and the estimate)."""

    def __init__(self, adapted: LoadedModel, params: AdaptParams) -> None:
        from .finetune import _AdamW

        self.loaded = adapted
        self.params = params
        self.model = adapted.model
        self.prefix, self.rest = _split_encoder(self.model.image_encoder)
        ad, dec = _trainable(self.model)
        if params.decoder_lr <= 0:
            dec = []
        for p in ad + dec:
            p.requires_grad_(True)
        self.opts = [(_AdamW(ad, lr=params.lr, weight_decay=params.weight_decay), params.lr)]
        if dec:
            self.opts.append((_AdamW(dec, lr=params.decoder_lr, weight_decay=params.weight_decay), params.decoder_lr))
        self.params_list = ad + dec
        self.depth = 2 * adapter_config(adapted).context + 1 if adapter_config(adapted).sd_trans else 1
        dev = adapted.device
        self.autocast_dtype = None
        if dev.type == "cuda":
            import torch

            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        elif params.cpu_bf16:
            import torch

            self.autocast_dtype = torch.bfloat16

    def train_mode(self, on: bool) -> None:
        for name, mod in self.model.named_modules():
            if name.endswith((".adapter", ".lora", ".token_adapter")) or name == "mask_decoder":
                mod.train(on)

    def compute_prefix(self, stack: np.ndarray) -> Any:
        """``(D, 3, S, S)`` model inputs -> frozen prefix activations ``(D, ...)`` (no autograd)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(stack)).to(self.loaded.device)
        with torch.no_grad():
            return self.prefix(x)

    def step(self, batch: Sequence[_Sample], boxes_xy: Sequence[np.ndarray], step: int) -> float:
        """One optimiser step on ``batch`` with model-frame XYXY boxes per sample; returns the loss."""
        import torch

        from .device import autocast
        from .nets.adapters import depth_context

        dev = self.loaded.device
        warm = min(1.0, (step + 1) / max(1, self.params.warmup_steps))
        for opt, lr in self.opts:
            opt.lr = lr * warm
        prefix = torch.cat([s.prefix for s in batch])  # (B*D, ...)
        n_obj = [len(b) for b in boxes_xy]
        owner = torch.tensor([i for i, n in enumerate(n_obj) for _ in range(n)], device=dev)
        boxes = torch.from_numpy(np.concatenate(boxes_xy).astype(np.float32)).to(dev)
        target = torch.cat([s.targets for s in batch])
        valid = torch.stack([s.valid for s in batch])[owner]
        pe = self.model.prompt_encoder
        dtype = self.autocast_dtype
        for attempt in range(2):
            with autocast(dev, dtype), depth_context(self.depth):
                emb = self.rest(prefix)
                if self.depth > 1:
                    emb = emb.view(len(batch), self.depth, *emb.shape[1:])[:, self.depth // 2]
                with torch.no_grad():
                    sparse, dense = pe(None, boxes, None)
                    dense_pe = pe.get_dense_pe()
                logits, iou = self.model.mask_decoder(emb[owner], dense_pe, sparse, dense, multimask_output=False)
            loss = _box_loss(logits[:, 0], iou[:, 0], target, valid)
            if bool(torch.isfinite(loss)) or dtype is None or attempt:
                break
            dtype = self.autocast_dtype = None  # bf16 gave a non-finite loss: fp32 from now on
        for opt, _ in self.opts:
            opt.zero_grad()
        value = float(loss.detach())
        if math.isfinite(value):
            loss.backward()
            for opt, _ in self.opts:
                opt.step()
        return value

    def finish(self) -> None:
        for p in self.params_list:
            p.requires_grad_(False)
            p.grad = None
        self.model.eval()


def _shift_px(loaded: LoadedModel, params: AdaptParams, tf: Any) -> tuple[float, float]:
    shift = params.box_shift if params.box_shift is not None else 20.0 * loaded.spec.input_size / 1024
    sy, sx = tf.scale_rc
    return (shift / sy, shift / sx)


def _model_boxes(tf: Any, boxes_rc: np.ndarray) -> np.ndarray:
    """``(N, 4)`` (r0, c0, r1, c1) original pixels -> model-frame XYXY, through segment's one flip."""
    from .segment import _rc_to_xy

    _, xy = _rc_to_xy(tf, np.zeros((0, 2), np.float32), boxes_rc)
    return xy


def estimate_seconds(loaded: LoadedModel, config: AdapterConfig = AdapterConfig(),
                     params: AdaptParams = AdaptParams(), *, n_slices: int = 1, objects: int = 1,
                     repeats: int = 1) -> dict[str, float]:
    """Time a training step on a synthetic batch of the same sizes on this machine now (the last of
    ``repeats``; the first includes one-time costs, so one step errs on the long side) and multiply;
    returns ``{"step_s", "steps", "prepare_s", "total_s"}``. ``loaded`` is not changed."""
    import torch

    adapted = inject_adapters(loaded, config, seed=params.seed)
    threads = _threads(params)
    prev = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        tr = _Trainer(adapted, params)
        tr.train_mode(True)
        s = loaded.spec.input_size
        side = loaded.spec.low_res_size
        rng = np.random.default_rng(0)
        bs = max(1, min(params.batch_size, n_slices))
        t0 = time.perf_counter()
        stack = rng.random((tr.depth, 3, s, s), dtype=np.float32)
        prefix = tr.compute_prefix(stack)
        prepare = time.perf_counter() - t0
        tgt = torch.zeros(objects, side, side, device=loaded.device)
        tgt[:, side // 4:3 * side // 4, side // 4:3 * side // 4] = 1.0
        sample = _Sample(slice=0, prefix=prefix, boxes=[], targets=tgt, valid=torch.ones(side, side, device=loaded.device))
        box = np.tile(np.array([[s / 4, s / 4, 3 * s / 4, 3 * s / 4]], np.float32), (objects, 1))
        times = []
        for i in range(max(1, int(repeats))):
            t0 = time.perf_counter()
            tr.step([sample] * bs, [box] * bs, i)
            times.append(time.perf_counter() - t0)
        tr.finish()
    finally:
        if threads > 0:
            torch.set_num_threads(prev)
    step_s = times[-1]
    # the prefix is computed for each training slice (and its neighbours) once
    n_prefix = n_slices if tr.depth == 1 else n_slices * tr.depth
    return {"step_s": step_s, "steps": float(params.steps), "prepare_s": prepare * n_prefix,
            "total_s": step_s * params.steps + prepare * n_prefix}


def _threads(params: AdaptParams) -> int:
    from .finetune import default_threads

    return default_threads() if params.threads is None else int(params.threads)


def train_adapters(encoder: Any, labels: Any, slices: Sequence[int] | None = None, *,
                   config: AdapterConfig = AdapterConfig(), params: AdaptParams = AdaptParams(),
                   class_ids: Sequence[int] | None = None, init: TrainedAdapter | None = None,
                   cancel: threading.Event | None = None) -> ProgressGen[TrainedAdapter]:
    """Train adapters + mask decoder on labelled slices with jittered box prompts.

    ``encoder``: a :class:`~napari_medsam.core.encoder.VolumeEncoder` of the image (its model may
    be plain or adapted: the base model is what gets adapted); ``labels``: integer array of the
    image's shape; ``slices``: training slices along the encoder's axis (None: every labelled
    slice); ``class_ids``: label values to learn (None: all found). Each class on a slice is one
    object prompted by its (jittered) bounding box. ``init``: continue training a previous adapter
    (its configuration is kept; ``config`` is then ignored).

    Yields ``Progress`` (``"preparing"`` per slice, then ``"training"`` per step with ``info =
    {"loss", "elapsed", "eta"}``); returns a :class:`TrainedAdapter` whose model is frozen and in
    eval mode. Stops between steps when ``cancel`` is set (raises :class:`Cancelled`).
    """
    import torch

    from .finetune import _check_labels, _labels_slice, labelled_slices

    labels = _check_labels(labels, encoder)
    base = base_model(encoder.loaded)
    from .speed import INT8_VARIANT

    if INT8_VARIANT in base.variant:
        raise MedSamError("adapters train on the float model: load it without --int8 to train, "
                          "then use the adapter with or without int8")
    if params.steps < 1 or params.batch_size < 1:
        raise MedSamError("steps and batch_size must be at least 1")
    axis = encoder.axis
    chosen = labelled_slices(labels, axis) if slices is None else sorted({int(s) for s in slices})
    if not chosen:
        raise InvalidImageError("the labels are empty: draw at least one labelled region before training")
    for s in chosen:
        if not 0 <= s < encoder.n_slices:
            raise InvalidImageError(f"training slice {s} is outside 0..{encoder.n_slices - 1} along axis {axis}")
    labs = {s: np.asarray(_labels_slice(labels, axis, s, encoder.is_3d)) for s in chosen}
    if class_ids is None:
        found = np.unique(np.concatenate([np.unique(v) for v in labs.values()]))
        ids = tuple(int(v) for v in found if v != 0)
    else:
        ids = tuple(int(v) for v in class_ids)
    if init is not None:
        config = init.meta.adapter

    threads = _threads(params)
    prev_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        if init is not None:
            adapted = inject_adapters(base, config, seed=params.seed)
            adapted.model.load_state_dict(adapter_state(init.loaded), strict=False)
        else:
            adapted = inject_adapters(base, config, seed=params.seed)
        tr = _Trainer(adapted, params)
        tf = encoder.transform()
        side = base.spec.low_res_size
        valid_np = tf.mask_to_model_lowres(np.ones(tf.original, np.float32), side)
        valid = torch.from_numpy(np.ascontiguousarray(valid_np, np.float32)).to(base.device)
        from .segment import box_of

        samples: list[_Sample] = []
        k = config.context if config.sd_trans else 0
        last = encoder.n_slices - 1
        t0 = time.perf_counter()
        for i, s in enumerate(chosen):
            if cancel is not None and cancel.is_set():
                raise Cancelled("adapter training stopped while preparing; nothing was saved")
            objs = _objects(labs[s], ids, params.min_area)
            if objs:
                stack = np.stack([encoder.model_input(min(max(s + o, 0), last)) for o in range(-k, k + 1)])
                tg = np.stack([(tf.mask_to_model_lowres(m.astype(np.float32), side) >= 0.5).astype(np.float32)
                               for _, m in objs])
                samples.append(_Sample(slice=s, prefix=tr.compute_prefix(stack),
                                       boxes=[box_of(m) for _, m in objs],  # type: ignore[misc]
                                       targets=torch.from_numpy(tg).to(base.device), valid=valid))
            yield Progress(i + 1, len(chosen), "preparing", {"slice": s})
        if not samples:
            raise InvalidImageError(f"slices {chosen} hold no object of at least {params.min_area} pixels "
                                    f"of the classes {list(ids)}")
        prepare_s = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(int(params.seed))
        shift = _shift_px(base, params, tf)
        bs = min(params.batch_size, len(samples))
        order: list[int] = []
        losses: list[float] = []
        tr.train_mode(True)
        t0 = time.perf_counter()
        for step in range(params.steps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"adapter training stopped at step {step} of {params.steps}; nothing was saved")
            if len(order) < bs:
                order += [int(v) for v in torch.randperm(len(samples), generator=gen)]
            batch = [samples[j] for j in order[:bs]]
            del order[:bs]
            boxes = [_model_boxes(tf, _jittered_boxes(b.boxes, tf.original, shift, gen)) for b in batch]
            losses.append(tr.step(batch, boxes, step))
            elapsed = time.perf_counter() - t0
            yield Progress(step + 1, params.steps, "training",
                           {"loss": losses[-1], "elapsed": elapsed,
                            "eta": elapsed / (step + 1) * (params.steps - step - 1)})
        tr.finish()
        seconds = time.perf_counter() - t0
    finally:
        if threads > 0:
            torch.set_num_threads(prev_threads)
    adapted = _with_identity(adapted, base, config)
    tail = losses[-max(1, min(10, len(losses))):]
    history = {"steps": len(losses), "seconds": round(seconds, 3), "prepare_seconds": round(prepare_s, 3),
               "seconds_per_slice_step": round(seconds / max(1, len(losses) * bs), 4),
               "final_loss": float(np.mean(tail)), "first_loss": losses[0], "n_slices": len(samples),
               "precision": "fp32" if tr.autocast_dtype is None else str(tr.autocast_dtype).replace("torch.", "")}
    if init is not None:
        history["continued_from"] = dict(init.meta.history)
    prev_slices = tuple(init.meta.training_slices) if init is not None else ()
    meta = AdapterMeta(
        config=config.to_dict(), backbone=base.name, weights_hash=base.weights_hash, base_variant=base.variant,
        digest=adapted.model.adapter_digest, axis=axis, preprocess=encoder._prep,
        intensity=dataclasses.asdict(encoder.intensity), class_ids=ids,
        training_slices=tuple(sorted(set(prev_slices) | {s.slice for s in samples})),
        training_image=encoder.content_hash, parameters=parameter_counts(adapted), train_params=params.to_dict(),
        history=history, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return TrainedAdapter(loaded=adapted, meta=meta)


def adapted_encoder(encoder: Any, adapted: LoadedModel) -> Any:
    """A :class:`~napari_medsam.core.encoder.VolumeEncoder` of the same image, axis, intensity and
    cache for ``adapted`` (its embeddings are keyed apart)."""
    from .encoder import VolumeEncoder

    return VolumeEncoder(adapted, encoder.volume, axis=encoder.axis, intensity=encoder.intensity,
                         cache=encoder.cache, batch_size=encoder.batch_size, content_hash=encoder.content_hash)


# ------------------------------------------------------------------------------------------------
# files


def save_adapter(path: str | os.PathLike, trained: TrainedAdapter) -> Path:
    """Write the adapter (its weights, the decoder's and the metadata) to one file, atomically."""
    from .tensorfile import save_tensor_file

    payload = {"format": ADAPTER_FORMAT, "meta": trained.meta.to_json(), "state": adapter_state(trained.loaded)}
    return save_tensor_file(path, payload)


def _check_adapter_format(p: Path, fmt: Any) -> None:
    if isinstance(fmt, str) and fmt.startswith("napari-medsam-head/"):
        raise CheckpointError(f"{p} is a prompt-free head file, not an adapter: use it with `predict --head`")
    if fmt != ADAPTER_FORMAT:
        raise CheckpointError(f"{p} is not a napari-medsam adapter file (format {fmt!r}, expected "
                              f"{ADAPTER_FORMAT!r}); write one with `napari-medsam train --adapter medsa|lora`")


def _read(path: str | os.PathLike) -> tuple[AdapterMeta, dict[str, Any]]:
    from .tensorfile import read_tensor_file

    p, payload, state = read_tensor_file(path, what="adapter", written_by="written by `napari-medsam train --adapter`",
                                         check_format=_check_adapter_format)
    try:
        meta = AdapterMeta.from_json(payload.get("meta", ""))
        meta.adapter  # noqa: B018 - validates the configuration
    except (TypeError, ValueError, MedSamError) as e:
        raise CheckpointError(f"{p}: the adapter file's metadata cannot be read ({e})") from e
    return meta, state


def read_adapter_meta(path: str | os.PathLike) -> AdapterMeta:
    """The metadata of an adapter file (backbone, configuration, training), without loading weights into a model."""
    return _read(path)[0]


def load_adapter(path: str | os.PathLike, loaded: LoadedModel) -> TrainedAdapter:
    """Read an adapter file (no pickled code runs) and apply it to ``loaded`` (or its base).

    Refused with :class:`HeadMismatchError` when the file was trained on another backbone or other
    weights; missing, unexpected or misshapen tensors, or weights whose hash differs from the one
    recorded, raise :class:`CheckpointError`.
    """
    meta, state = _read(path)
    base = base_model(loaded)
    if meta.backbone != base.name or meta.weights_hash != base.weights_hash:
        raise HeadMismatchError(
            f"{path}: this adapter was trained on {meta.backbone!r} (weights sha256 {meta.weights_hash[:12]}...), "
            f"but the loaded model is {base.name!r} (weights sha256 {base.weights_hash[:12]}...): load "
            f"{meta.backbone!r} with the same weights to use it (CLI: --model {meta.backbone})")
    config = meta.adapter
    adapted = inject_adapters(base, config)
    expected = set(_adapter_names(adapted.model))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: the adapter's weights do not fit a {config.tag!r} adapter on "
                              f"{base.name!r} (missing: {missing[:6]}, unexpected: {unexpected[:6]})")
    try:
        adapted.model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the adapter's weights do not fit its architecture: {e}") from e
    adapted = _with_identity(adapted, base, config)
    if adapted.model.adapter_digest != meta.digest:
        raise CheckpointError(f"{path}: the adapter's weights do not match the hash recorded in the file "
                              "(corrupt or edited); train it again")
    return TrainedAdapter(loaded=adapted, meta=meta)
