"""ESP-MedSAM's self-prompting decoder (Xu et al. 2024, now De-LightSAM), rebuilt as a multi-class head.

Self-patch prompt generator (SPPG): a 2x2 stride-2 conv (C -> 64), LayerNorm, GELU and a 1x1 conv
predict a coarse patch map per foreground class from the embedding (``(B, K-1, h/2, w/2)``:
32x32 patches of 8x8 pixels for LiteMedSAM), supervised by the max-pooled labels (a patch is
positive where any of its pixels holds the class). Its probabilities (detached, as the original
detaches its logits) are upsampled to the grid (``prompt_upsample``: bilinear by default) and turned
by a 1x1 conv, LayerNorm and GELU into a dense prompt that is **added** to the embedding.
Nearest upsampling (the original's, and this head's before 2026-12-02; files saved then keep it)
makes the prompt piecewise constant over 2x2 cells: one patch the map gets wrong on an unseen
slice turned into a square 8 px hole (background) in the masks, since the LayerNorm gives every
cell's prompt the same size whatever the probabilities. Bilinear upsampling lets a single wrong
patch blend with its neighbours.

Query-decoupled decoder: one learnable query per class (background included) through the
backbone's two-way transformer (initialised from its decoder, positional encoding its own), the
4x upscaling and ONE hypernetwork MLP shared by all queries (the original's "decoupled" queries
with a shared head); ``K``-way softmax like the other heads. The original has one query per
imaging modality and keeps one binary mask; here a query per class gives every structure from one
pass.

Differences from the ESP-MedSAM code: the dense prompt reads the patch probabilities instead of
their 0.5 threshold (the thresholded map is piecewise constant: the prompt's conv would learn only
from whichever patches happen to cross 0.5); the backbone's no-mask embedding is added as SAM's
decoder always saw it; no boxes or points are derived from the patch map (the dense prompt is
the whole prompt). Loss: CE + Dice of the masks plus ``patch_weight`` x binary cross-entropy of the
patch map.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.common import LayerNorm2d
from ..registry import ModelSpec
from .base import DecoderHead, pe_windows
from .hsam import hypernetwork_product


def patch_targets(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, K, L, L)`` class fractions -> ``(B, K-1, *size)``: 1 where a patch holds any pixel of a class."""
    return F.adaptive_max_pool2d((target[:, 1:] > 0.5).float(), size)


#: how the patch map reaches the embedding grid: "bilinear" (default) or "nearest" (the original's)
UPSAMPLING = ("bilinear", "nearest")


def upsample_patches(prob: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """``(B, K-1, h/2, w/2)`` patch probabilities -> ``(B, K-1, h, w)`` on the embedding grid."""
    if mode == "nearest":
        return F.interpolate(prob, size=size, mode="nearest")
    return F.interpolate(prob, size=size, mode="bilinear", align_corners=False)


class SelfPromptHead(DecoderHead):
    """``(B, C, h, w)`` -> patch map -> dense prompt added -> two-way transformer with ``K`` queries -> logits."""

    kind = "selfprompt"
    default_lr = 2e-4
    crops = True
    positional = True

    def __init__(self, *, num_classes: int, spec: ModelSpec, backbone: Any = None, patch_width: int = 64,
                 patch_weight: float = 1.0, prompt_upsample: str = "bilinear") -> None:
        if prompt_upsample not in UPSAMPLING:
            raise ValueError(f"prompt_upsample must be one of {', '.join(UPSAMPLING)}, got {prompt_upsample!r}")
        super().__init__(num_classes=num_classes, spec=spec,
                         config={"patch_width": int(patch_width), "patch_weight": float(patch_weight),
                                 "prompt_upsample": str(prompt_upsample)})
        dec, prompt_encoder = self.decoder_parts(spec, backbone)
        c = self.embedding_shape[0]
        fg = self.num_classes - 1
        self.patch_weight = float(patch_weight)
        self.patch_net = nn.Sequential(nn.Conv2d(c, patch_width, kernel_size=2, stride=2), LayerNorm2d(patch_width),
                                       nn.GELU(), nn.Conv2d(patch_width, fg, kernel_size=1))
        self.prompt_net = nn.Sequential(nn.Conv2d(fg, c, kernel_size=1), LayerNorm2d(c), nn.GELU())
        n_src = dec.mask_tokens.weight.shape[0]
        pick = [k % n_src for k in range(self.num_classes)]
        self.queries = nn.Parameter(dec.mask_tokens.weight.detach()[pick].clone())  # (K, C)
        self.transformer = copy.deepcopy(dec.transformer)
        self.output_upscaling = copy.deepcopy(dec.output_upscaling)
        self.hypernetwork = copy.deepcopy(dec.output_hypernetworks_mlps[0])  # shared by all queries
        self.copy_prompt_encoding(prompt_encoder)
        self.make_trainable()

    def outputs(self, embedding: torch.Tensor, origin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask logits ``(B, K, 4h, 4w)``, patch logits ``(B, K-1, h/2, w/2)``)."""
        b, c, h, w = embedding.shape
        src = embedding.float() if embedding.dtype == torch.float16 else embedding
        patch = self.patch_net(src)  # (B, K-1, h/2, w/2)
        prob = upsample_patches(torch.sigmoid(patch.detach()), (h, w), self.config["prompt_upsample"])
        src = src + self.no_mask_embed.view(1, c, 1, 1) + self.prompt_net(prob)
        pe = pe_windows(self.dense_pe(), (h, w), origin).to(src.dtype)
        tokens = self.queries.unsqueeze(0).expand(b, -1, -1)
        hs, keys = self.transformer(src, pe, tokens)  # (B, K, C), (B, hw, C)
        up = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        hyper = self.hypernetwork(hs)  # (B, K, C/8): one MLP for every query
        return hypernetwork_product(hyper, up), patch

    def forward(self, embedding: torch.Tensor, image: torch.Tensor | None = None,
                origin: torch.Tensor | None = None) -> torch.Tensor:
        return self.outputs(embedding, origin)[0]

    def training_forward(self, embedding: torch.Tensor, image: torch.Tensor | None = None, *,
                         origin: torch.Tensor | None = None) -> Any:
        return self.outputs(embedding, origin)

    def loss(self, outputs: Any, target: torch.Tensor, progress: float, *, dice_weight: float = 1.0) -> torch.Tensor:
        from ..finetune import segmentation_loss

        masks, patch = outputs
        patch_loss = F.binary_cross_entropy_with_logits(patch.float(), patch_targets(target, tuple(patch.shape[-2:])))
        return segmentation_loss(masks, target, dice_weight=dice_weight) + self.patch_weight * patch_loss
