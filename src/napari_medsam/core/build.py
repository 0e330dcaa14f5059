"""The one composition root: every network's hyperparameters live here and nowhere else."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from .loaded import LoadedModel
from .registry import ModelSpec, get_spec

__all__ = ["LoadedModel", "build_sam", "count_parameters", "load_model"]


def _tiny_vit(*, dims: tuple[int, ...], depths: tuple[int, ...], heads: tuple[int, ...],
              windows: tuple[int, ...], patch_kernel: int, patch_stride: int, out_chans: int = 256) -> Any:
    from .nets.tiny_vit import TinyViT

    return TinyViT(embed_dims=dims, depths=depths, num_heads=heads, window_sizes=windows,
                   patch_kernel=patch_kernel, patch_stride=patch_stride, merge_strides=(2, 2, 1),
                   out_chans=out_chans)


def _vit(*, dim: int, depth: int, heads: int, global_idx: tuple[int, ...], img_size: int = 1024,
         patch: int = 16, window: int = 14, out_chans: int = 256) -> Any:
    from .nets.vit import ImageEncoderViT

    return ImageEncoderViT(img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                           window_size=window, global_attn_indexes=global_idx, out_chans=out_chans)


_TINYVIT = {"dims": (64, 128, 160, 320), "depths": (2, 2, 6, 2), "heads": (2, 4, 5, 10), "windows": (7, 7, 14, 7)}

ENCODERS: dict[str, Callable[[], Any]] = {
    "tiny_vit_lite": lambda: _tiny_vit(**_TINYVIT, patch_kernel=1, patch_stride=1),
    "tiny_vit_mobile": lambda: _tiny_vit(**_TINYVIT, patch_kernel=3, patch_stride=2),
    "vit_b": lambda: _vit(dim=768, depth=12, heads=12, global_idx=(2, 5, 8, 11)),
    "vit_l": lambda: _vit(dim=1024, depth=24, heads=16, global_idx=(5, 11, 17, 23)),
    "vit_h": lambda: _vit(dim=1280, depth=32, heads=16, global_idx=(7, 15, 23, 31)),
    # tiny random encoders for tests: 64 px in, (32, 16, 16) out
    "test_tiny_vit": lambda: _tiny_vit(dims=(8, 16, 16, 24), depths=(1, 1, 1, 1), heads=(1, 2, 2, 2),
                                       windows=(7, 7, 7, 7), patch_kernel=1, patch_stride=1, out_chans=32),
    "test_vit": lambda: _vit(dim=32, depth=2, heads=2, global_idx=(1,), img_size=64, patch=4, window=4,
                             out_chans=32),
}


def build_sam(spec: ModelSpec) -> Any:
    """A :class:`~napari_medsam.core.nets.sam.SamModel` for ``spec`` with freshly initialised weights."""
    from .nets.sam import MaskDecoder, PromptEncoder, SamModel, TwoWayTransformer

    c, h, w = spec.embedding_shape
    small = c < 256
    return SamModel(
        image_encoder=ENCODERS[spec.encoder](),
        prompt_encoder=PromptEncoder(embed_dim=c, image_embedding_size=(h, w),
                                     input_image_size=(spec.input_size, spec.input_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            transformer_dim=c,
            transformer=TwoWayTransformer(depth=2, embedding_dim=c, num_heads=2 if small else 8,
                                          mlp_dim=64 if small else 2048),
            num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=64 if small else 256,
        ),
    )


_SEEDED_BUILD = threading.Lock()


def _build_seeded(spec: ModelSpec, seed: int) -> Any:
    """``build_sam(spec)`` with random weights from ``seed``, the same in every thread.

    The modules initialise from torch's global generator: seeding it and building are done under
    one lock (two cohort workers, threads of one process, loading at once would otherwise draw
    from each other's sequence and get other weights than the head was trained on), inside
    ``fork_rng`` so the caller's generator state is left as it was. A thread that draws from the
    global generator *without* this lock while a test model builds can still change its weights;
    real checkpoints overwrite the random init, so only ``test_*`` models are concerned.
    """
    import torch

    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam(spec)


def load_model(name: str | ModelSpec = "litemedsam", *, weights: str | os.PathLike | None = None,
               device: str = "auto", precision: str = "auto", cache_dir: str | os.PathLike | None = None,
               download: bool = True, progress: Callable[[int, int], None] | None = None,
               seed: int = 0, fuse: bool = True, optimize: bool = True, int8: bool = False,
               trust_weights: bool = False) -> LoadedModel:
    """Build a registered model and load its weights strictly; move it to ``device``.

    Test models (``test_*``) get seeded random weights. ``fuse`` folds conv+batchnorm pairs
    for inference (same outputs, fewer kernels). ``optimize`` applies the exact inference
    speed-ups of :func:`~napari_medsam.core.speed.optimize_for_inference`; ``int8`` adds its
    int8 quantization of the encoder (CPU; other embeddings, so other cache keys).
    ``trust_weights`` vouches for a weights file that has no published checksum (see
    :func:`~napari_medsam.core.weights.resolve_weights`).
    """
    from .device import resolve_device, resolve_precision
    from .weights import load_checkpoint, load_state_dict_strict, resolve_weights

    spec = name if isinstance(name, ModelSpec) else get_spec(name)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    if spec.weights.random_init and weights is None:
        model = _build_seeded(spec, seed)
        path, digest = None, f"random-seed{seed}"
    else:
        path_, digest = resolve_weights(spec, path=weights, cache_dir=cache_dir, download=download,
                                        progress=progress, trust=trust_weights)
        model = build_sam(spec)
        load_state_dict_strict(model, load_checkpoint(path_), source=str(path_))
        path = str(path_)
    model.eval()
    if fuse:
        from .nets.tiny_vit import fuse_conv_bn

        fuse_conv_bn(model.image_encoder)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(dev)
    loaded = LoadedModel(spec=spec, model=model, device=dev, dtype=dtype, weights_path=path, weights_hash=digest)
    if optimize or int8:
        from .speed import optimize_for_inference

        loaded = optimize_for_inference(loaded, int8=int8)
    return loaded


def count_parameters(spec: ModelSpec) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    import torch

    with torch.device("meta"):
        model = build_sam(spec)
    return sum(p.numel() for p in model.parameters())
