"""Trainable prompt-free heads on frozen image embeddings: a registry of head families.

A head maps a batch of cached embeddings ``(B, C, h, w)`` to class logits ``(B, K, L, L)`` in the
model's input frame at the decoder's low-res side ``L = 4h`` (LiteMedSAM: 256 = its input size),
``K`` classes with background as channel 0 (softmax over ``K``). Logits go back to a slice's own
pixels with :meth:`~napari_medsam.core.preprocess.SliceTransform.logits_to_original`, exactly as the
prompted decoder's do.

Families (AutoSAM, Hu et al. 2023, rebuilt on LiteMedSAM's 64x64 grid; see docs/METHODS):

``linear``
    A 1x1 projection of the embedding to ``K`` logits, bilinearly upsampled: the probe.
``cnn``
    A UNet-style decoder: conv blocks and 2x transposed-conv stages from the embedding grid up to
    ``L`` (two stages for 64 -> 256), with skip connections from the model-input image
    (``image_skip``, default on), which a decoder on a 64x64 grid alone cannot see.
``autosam``
    SAM's own mask decoder with the prompt tokens removed and one output token per class,
    initialised from the backbone's decoder and using the backbone's positional encoding, so all
    classes come out of one transformer pass.
``hsam``
    H-SAM's two-stage hierarchical decoder (Cheng et al. 2024): the autosam decoder gives a prior
    mask; a second two-way transformer (one layer by default) with fresh class tokens attends under
    that prior; H-SAM's class-balanced re-weighting of the embedding and its pixel decoder fusing both
    stages are options (``masa``, ``hierarchical``; off by default: they measured worse here).
``selfprompt``
    ESP-MedSAM's self-prompting decoder (Xu et al. 2024): a coarse per-class patch map predicted
    from the embedding becomes a dense prompt; one query per class through SAM's decoder.

Each head is an ``nn.Module`` with ``kind``, ``num_classes``, ``config`` (JSON-able keyword
arguments that rebuild it), ``uses_image`` and ``default_lr``; its ``forward(embedding, image=None)``
takes the model-input image ``(B, 3, S, S)`` only when ``uses_image``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import MedSamError, UnknownModelError
from ..registry import ModelSpec


def _linear(**kw: Any) -> Any:
    from .linear import LinearHead

    return LinearHead(**kw)


def _cnn(**kw: Any) -> Any:
    from .cnn import CNNHead

    return CNNHead(**kw)


def _autosam(**kw: Any) -> Any:
    from .autosam import AutoSamHead

    return AutoSamHead(**kw)


def _hsam(**kw: Any) -> Any:
    from .hsam import HSamHead

    return HSamHead(**kw)


def _selfprompt(**kw: Any) -> Any:
    from .selfprompt import SelfPromptHead

    return SelfPromptHead(**kw)


#: kind -> builder taking ``num_classes``, ``spec``, ``backbone`` (a SamModel or None) and the config.
HEADS: dict[str, Callable[..., Any]] = {
    "linear": _linear,
    "cnn": _cnn,
    "autosam": _autosam,
    "hsam": _hsam,
    "selfprompt": _selfprompt,
}

#: per kind, options whose default changed since head files were first written, with the value those
#: files were trained with: a saved config lacking the option is read with it (``load_head``)
SAVED_DEFAULTS: dict[str, dict[str, Any]] = {
    "hsam": {"stage2_layers": None},  # before 2026-12-02 stage 2 had all of the backbone's two-way layers
    "selfprompt": {"prompt_upsample": "nearest"},  # before 2026-12-02 the patch map was nearest-upsampled
}

HEAD_DESCRIPTIONS: dict[str, str] = {
    "linear": "1x1 projection of the embedding, bilinear upsampling (probe; ~1k parameters)",
    "cnn": "UNet-style convolutional decoder up to the decoder's 4x resolution, image skips (~0.1M parameters)",
    "autosam": "SAM mask decoder without prompts, one token per class, initialised from the backbone (~4M)",
    "hsam": "H-SAM: two-stage decoder, the first stage's prior mask guides the second (both from the backbone; ~6M)",
    "selfprompt": "ESP-MedSAM: a predicted patch map as dense prompt, one query per class (from the backbone; ~4M)",
}


def build_head(kind: str, *, num_classes: int, loaded: Any, **config: Any) -> Any:
    """A freshly initialised head of family ``kind`` for ``num_classes`` classes (background included).

    ``loaded`` is a :class:`~napari_medsam.core.build.LoadedModel` (heads that start from the
    backbone's decoder copy its weights) or a bare :class:`~napari_medsam.core.registry.ModelSpec`
    (shapes only: for rebuilding a head whose weights are loaded next). ``config`` are the family's
    keyword options (see each head's class); unknown options raise :class:`MedSamError`.
    Uses torch's global random generator for initialisation: seed it (or fork it) around the call.
    """
    if kind not in HEADS:
        raise UnknownModelError(f"unknown head {kind!r}; choose one of: {', '.join(HEADS)}")
    if num_classes < 2:
        raise MedSamError(f"a head needs background plus at least one class, got num_classes={num_classes}")
    if isinstance(loaded, ModelSpec):
        spec, backbone = loaded, None
    else:
        spec, backbone = loaded.spec, loaded.model
    try:
        head = HEADS[kind](num_classes=int(num_classes), spec=spec, backbone=backbone, **config)
    except TypeError as e:
        raise MedSamError(f"invalid options for the {kind!r} head: {e}") from e
    if backbone is not None:
        head.to(next(backbone.parameters()).device)
    return head


__all__ = ["HEADS", "HEAD_DESCRIPTIONS", "SAVED_DEFAULTS", "build_head"]
