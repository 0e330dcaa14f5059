"""The linear probe: a 1x1 projection of the embedding to class logits, bilinearly upsampled."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ModelSpec
from .base import Head


class LinearHead(Head):
    """``(B, C, h, w)`` -> 1x1 conv -> ``(B, K, h, w)`` -> bilinear -> ``(B, K, 4h, 4w)``.

    ``C * K + K`` parameters: what the frozen features separate linearly, at the embedding's
    resolution (one token covers 4x4 pixels of the model frame).
    """

    kind = "linear"
    default_lr = 1e-2
    crops = True

    def __init__(self, *, num_classes: int, spec: ModelSpec, backbone: Any = None) -> None:
        super().__init__(num_classes=num_classes, spec=spec, config={})
        self.proj = nn.Conv2d(self.embedding_shape[0], self.num_classes, kernel_size=1)

    def forward(self, embedding: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(embedding)  # (B, K, h, w)
        scale = self.out_size // self.embedding_shape[1]  # sizes follow the input: crops work too
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
