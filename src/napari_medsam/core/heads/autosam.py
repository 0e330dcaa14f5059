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
from typing import Any

import torch
from torch import nn

from ..registry import ModelSpec
from .base import DecoderHead


class AutoSamHead(DecoderHead):
    """``(B, C, h, w)`` -> two-way transformer with ``K`` class tokens -> 4x upscaling -> ``(B, K, 4h, 4w)``.

    ``backbone`` (a SamModel) gives the initial weights; without one the architecture is rebuilt
    from ``spec`` with random weights (to load a saved head into).
    """

    kind = "autosam"
    default_lr = 2e-4

    def __init__(self, *, num_classes: int, spec: ModelSpec, backbone: Any = None) -> None:
        super().__init__(num_classes=num_classes, spec=spec, config={})
        dec, prompt_encoder = self.decoder_parts(spec, backbone)
        n_src = dec.mask_tokens.weight.shape[0]
        pick = [k % n_src for k in range(self.num_classes)]
        self.transformer = copy.deepcopy(dec.transformer)
        self.output_upscaling = copy.deepcopy(dec.output_upscaling)
        self.class_tokens = nn.Parameter(dec.mask_tokens.weight.detach()[pick].clone())  # (K, C)
        self.hypernetworks = nn.ModuleList(copy.deepcopy(dec.output_hypernetworks_mlps[k]) for k in pick)
        self.copy_prompt_encoding(prompt_encoder)
        self.make_trainable()

    def forward(self, embedding: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = embedding.shape
        src = embedding + self.no_mask_embed.view(1, c, 1, 1)
        tokens = self.class_tokens.unsqueeze(0).expand(b, -1, -1)  # (B, K, C)
        hs, keys = self.transformer(src, self.dense_pe(), tokens)  # (B, K, C), (B, hw, C)
        up = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        hyper = torch.stack([mlp(hs[:, k]) for k, mlp in enumerate(self.hypernetworks)], dim=1)  # (B, K, C/8)
        _, c8, uh, uw = up.shape
        return (hyper @ up.reshape(b, c8, uh * uw)).reshape(b, self.num_classes, uh, uw)
