"""AutoSAM's head rebuilt: SAM's mask decoder without prompts, one output token per class.

What differs from the AutoSAM code (Hu et al. 2023, xhu248/AutoSAM): there, each class gets its own
IoU token and two mask tokens and the image embedding is replicated per class (K transformer
passes); its positional encoding is a *new random* Fourier matrix. Here the ``K`` class tokens
(background included) attend together in a single two-way transformer pass, and the positional
encoding is the backbone's own (``prompt_encoder.get_dense_pe()``: the same Gaussian Fourier
matrix, copied into the head so that a head file is self-contained). The image embedding gets the
backbone's ``no_mask_embed`` added, as SAM's decoder always saw it without a mask prompt.

Initialisation from the backbone's decoder: the transformer, the 4x upscaling, the no-mask
embedding; class token ``k`` and its hypernetwork MLP come from the backbone's mask token / MLP
``k mod 4`` (so classes start distinct). The IoU token and IoU head are dropped. Everything in the
head is trained.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from ..nets.sam import PositionEmbeddingRandom
from ..registry import ModelSpec
from .base import Head


def _decoder_skeleton(spec: ModelSpec) -> tuple[Any, Any]:
    """The backbone's (mask decoder, prompt encoder) architecture with fresh random weights.

    For rebuilding a head whose weights are about to be loaded from a file. The decoder's
    hyperparameters live in :func:`~napari_medsam.core.build.build_sam` and depend only on the
    spec's embedding shape and input size, so the spec is built with the tiny test encoder in
    place of its own: no large image encoder is allocated.
    """
    from ..build import build_sam

    sam = build_sam(dataclasses.replace(spec, encoder="test_tiny_vit"))
    return sam.mask_decoder, sam.prompt_encoder


class AutoSamHead(Head):
    """``(B, C, h, w)`` -> two-way transformer with ``K`` class tokens -> 4x upscaling -> ``(B, K, 4h, 4w)``.

    ``backbone`` (a SamModel) gives the initial weights; without one the architecture is rebuilt
    from ``spec`` with random weights (to load a saved head into).
    """

    kind = "autosam"
    default_lr = 2e-4

    def __init__(self, *, num_classes: int, spec: ModelSpec, backbone: Any = None) -> None:
        super().__init__(num_classes=num_classes, spec=spec, config={})
        if backbone is not None:
            dec, prompt_encoder = backbone.mask_decoder, backbone.prompt_encoder
        else:
            dec, prompt_encoder = _decoder_skeleton(spec)
        c = self.embedding_shape[0]
        n_src = dec.mask_tokens.weight.shape[0]
        pick = [k % n_src for k in range(self.num_classes)]
        self.transformer = copy.deepcopy(dec.transformer)
        self.output_upscaling = copy.deepcopy(dec.output_upscaling)
        self.class_tokens = nn.Parameter(dec.mask_tokens.weight.detach()[pick].clone())  # (K, C)
        self.hypernetworks = nn.ModuleList(copy.deepcopy(dec.output_hypernetworks_mlps[k]) for k in pick)
        self.no_mask_embed = nn.Parameter(prompt_encoder.no_mask_embed.weight.detach()[0].clone())  # (C,)
        self.pe_layer = PositionEmbeddingRandom(c // 2)
        self.pe_layer.positional_encoding_gaussian_matrix.copy_(
            prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.detach())
        for p in self.parameters():
            p.requires_grad_(True)
        self.to("cpu")

    def dense_pe(self) -> torch.Tensor:
        """``(1, C, h, w)``: identical to the backbone's ``prompt_encoder.get_dense_pe()``."""
        return self.pe_layer(self.embedding_shape[1:]).unsqueeze(0)

    def forward(self, embedding: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = embedding.shape
        src = embedding + self.no_mask_embed.view(1, c, 1, 1)
        tokens = self.class_tokens.unsqueeze(0).expand(b, -1, -1)  # (B, K, C)
        hs, keys = self.transformer(src, self.dense_pe(), tokens)  # (B, K, C), (B, hw, C)
        up = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        hyper = torch.stack([mlp(hs[:, k]) for k, mlp in enumerate(self.hypernetworks)], dim=1)  # (B, K, C/8)
        _, c8, uh, uw = up.shape
        return (hyper @ up.reshape(b, c8, uh * uw)).reshape(b, self.num_classes, uh, uw)
