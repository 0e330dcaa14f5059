"""A UNet-style convolutional decoder from the embedding grid up to the decoder's 4x resolution.

AutoSAM's CNN head is a plain stack of convolutions and two transposed convolutions (~20M
parameters, no skips). This one keeps its shape with far fewer channels (the embedding is already
a rich feature map; a few labelled slices cannot fit 20M weights) and adds what makes a UNet a
UNet: skip connections, here from a shallow pyramid over the model-input image, so that edges
finer than a 4x4-pixel token can be placed (``image_skip=True``, the default; on the MNI152 GM/WM
benchmark it is worth +0.08 mean Dice with 3 labelled slices in the coronal and the axial plane; with
one slice +0.12 coronally and -0.02 axially). Fully convolutional: it trains on crops of the grid
(:class:`~napari_medsam.core.finetune.TrainParams` ``crop``: windows of 3/8 of the grid by default).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ModelSpec
from .base import Head, conv_block, group_norm


class CNNHead(Head):
    """``(B, C, h, w)`` -> stem -> ``n`` x [2x transposed conv, (skip concat,) 2 conv blocks] -> 1x1 -> logits.

    ``width`` channels at the embedding grid, halved at each 2x stage (64 -> 128 -> 256 for
    LiteMedSAM: two stages; ~0.1M parameters with the defaults). With ``image_skip`` the image ``(B, 3, S, S)`` is resampled to the
    output side and encoded by a small conv pyramid (``skip_width`` channels at full resolution,
    doubled per level) whose levels are concatenated into the matching decoder stages.
    """

    kind = "cnn"
    default_lr = 3e-3
    crops = True
    # MNI152 GM/WM, coronal k = 3 and 10, axial k = 3, 3 seeds each (docs/benchmarks.md, issue 16 item 4):
    # bf16 prediction gave the fp32 Dice within 1e-4; bf16 training within the seeds' spread (paired
    # mean difference -0.0003 over the 9 runs, per seed -0.023 .. +0.024)
    bf16 = True
    bf16_training = True
    channels_last = True

    def __init__(self, *, num_classes: int, spec: ModelSpec, backbone: Any = None, width: int = 64,
                 image_skip: bool = True, skip_width: int = 16) -> None:
        super().__init__(num_classes=num_classes, spec=spec,
                         config={"width": int(width), "image_skip": bool(image_skip), "skip_width": int(skip_width)})
        self.uses_image = bool(image_skip)
        c, h, _ = self.embedding_shape
        self.n_up = max(0, round(math.log2(self.out_size / h)))
        self.stem = nn.Sequential(nn.Conv2d(c, width, kernel_size=1), group_norm(width), nn.GELU(),
                                  conv_block(width, width))
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        ch = width
        for i in range(self.n_up):
            out = max(ch // 2, 8)
            level = self.n_up - 1 - i  # 0 = full output resolution
            skip = skip_width * 2**level if image_skip else 0
            self.up.append(nn.ConvTranspose2d(ch, out, kernel_size=2, stride=2))
            self.blocks.append(nn.Sequential(conv_block(out + skip, out), conv_block(out, out)))
            ch = out
        self.out = nn.Conv2d(ch, self.num_classes, kernel_size=1)
        self.pyramid = nn.ModuleList()
        if image_skip:
            prev = 3
            for level in range(self.n_up):
                cw = skip_width * 2**level
                self.pyramid.append(nn.Sequential(conv_block(prev, cw), conv_block(cw, cw)))
                prev = cw

    def _image_features(self, image: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
        if tuple(image.shape[-2:]) != size:  # SAM's 1024 px input vs a 256 px output: average 4x4 blocks
            mode = "area" if image.shape[-1] > size[-1] else "bilinear"
            image = F.interpolate(image, size=size, mode=mode)
        feats = []
        x = image
        for level, block in enumerate(self.pyramid):
            if level:
                x = F.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)  # (B, skip_width * 2**level, L / 2**level, L / 2**level)
        return feats

    def forward(self, embedding: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        # sizes follow the input, so the head also runs on crops: (h, w) cells -> (4h, 4w) pixels
        scale = self.out_size // self.embedding_shape[1]
        size = (embedding.shape[-2] * scale, embedding.shape[-1] * scale)
        feats: list[torch.Tensor] = []
        if self.uses_image:
            if image is None:
                raise ValueError("this cnn head was built with image_skip=True and needs the model-input image")
            image_size = (embedding.shape[-2] * self.input_size // self.embedding_shape[1],
                          embedding.shape[-1] * self.input_size // self.embedding_shape[2])
            if tuple(image.shape[-2:]) != image_size:
                raise ValueError(f"image of size {tuple(image.shape[-2:])} for an embedding grid of "
                                 f"{tuple(embedding.shape[-2:])}: expected {image_size}")
            feats = self._image_features(image.to(embedding.dtype), size)
        x = self.stem(embedding)  # (B, width, h, w)
        for i, (up, block) in enumerate(zip(self.up, self.blocks, strict=True)):
            x = up(x)
            if feats:
                x = torch.cat([x, feats[self.n_up - 1 - i]], dim=1)
            x = block(x)
        x = self.out(x)  # (B, K, 4h, 4w) unless the grid ratio is not a power of 2
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x
