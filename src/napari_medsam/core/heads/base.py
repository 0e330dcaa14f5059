"""What every head shares: its identity (kind, classes, config) and the output geometry."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..nets.sam import PositionEmbeddingRandom
from ..registry import ModelSpec


class Head(nn.Module):
    """Base class of the prompt-free heads: ``(B, C, h, w)`` embeddings -> ``(B, K, L, L)`` logits.

    ``config`` holds the JSON-able keyword options that rebuild the same architecture with
    :func:`~napari_medsam.core.heads.build_head`; ``out_size`` is ``L`` (4x the embedding grid).
    """

    kind = ""
    uses_image = False      # forward needs the model-input image (B, 3, S, S)
    default_lr = 1e-3
    crops = False           # fully convolutional: may be trained on crops of the embedding grid
    positional = False      # uses absolute positions: trained on crops, it is told where each window lies
    #: its predictions checked under bf16 autocast on the MNI152 benchmark without a loss of Dice:
    #: ``precision="auto"`` predicts in bf16 where the model runs bf16 (core.device.head_precision)
    bf16 = False
    #: the same for its training (``TrainParams.precision="auto"``)
    bf16_training = False
    #: its convolutions run faster on channels-last activations (CPU oneDNN): prediction lays them
    #: out so; a layout change only, the arithmetic is the same
    channels_last = False

    def __init__(self, *, num_classes: int, spec: ModelSpec, config: dict[str, Any]) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.embedding_shape = tuple(int(s) for s in spec.embedding_shape)
        self.input_size = int(spec.input_size)
        self.out_size = int(spec.low_res_size)
        self.config = dict(config)

    def forward(self, embedding: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # the trainer's protocol: what a step computes and the loss it minimises

    def training_forward(self, embedding: torch.Tensor, image: torch.Tensor | None = None, *,
                         origin: torch.Tensor | None = None) -> Any:
        """What one training step computes from a batch (default: the logits of :meth:`forward`).

        ``origin``: ``(B, 2)`` grid cell (row, column) of each window's top-left corner when the
        trainer feeds windows of the grid to a :attr:`positional` head (None: whole grids).
        Multi-output heads return whatever their :meth:`loss` takes.
        """
        return self(embedding, image)

    def loss(self, outputs: Any, target: torch.Tensor, progress: float, *, dice_weight: float = 1.0) -> torch.Tensor:
        """The training loss of :meth:`training_forward`'s ``outputs`` against ``(B, K, L, L)`` class fractions.

        ``progress``: the fraction of the training run done so far, in [0, 1] (heads whose loss
        weighting moves during training read it). Default: cross-entropy + Dice of the logits.
        """
        from ..finetune import segmentation_loss

        return segmentation_loss(outputs, target, dice_weight=dice_weight)


class DecoderHead(Head):
    """Base of the heads made from a copy of SAM's mask decoder (AutoSAM, H-SAM, self-prompt).

    Their ``__init__`` takes the parts to copy from :meth:`decoder_parts`, the backbone's
    no-mask embedding and positional encoding with :meth:`copy_prompt_encoding` (SAM's decoder
    always saw both without a mask prompt), and ends with :meth:`make_trainable`.
    """

    @staticmethod
    def decoder_parts(spec: ModelSpec, backbone: Any = None) -> tuple[Any, Any]:
        """``backbone``'s (mask decoder, prompt encoder); without one, the same architecture with
        fresh random weights, for rebuilding a head whose weights are about to be loaded from a file.

        The decoder's hyperparameters live in :func:`~napari_medsam.core.build.build_sam` and depend
        only on the spec's embedding shape and input size, so the spec is built with the tiny test
        encoder in place of its own: no large image encoder is allocated.
        """
        if backbone is not None:
            return backbone.mask_decoder, backbone.prompt_encoder
        from ..build import build_sam

        sam = build_sam(dataclasses.replace(spec, encoder="test_tiny_vit"))
        return sam.mask_decoder, sam.prompt_encoder

    def copy_prompt_encoding(self, prompt_encoder: Any) -> None:
        """``no_mask_embed`` ``(C,)`` and ``pe_layer``: copies of the prompt encoder's."""
        self.no_mask_embed = nn.Parameter(prompt_encoder.no_mask_embed.weight.detach()[0].clone())  # (C,)
        self.pe_layer = PositionEmbeddingRandom(self.embedding_shape[0] // 2)
        self.pe_layer.positional_encoding_gaussian_matrix.copy_(
            prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.detach())

    def make_trainable(self) -> None:
        """Every parameter trained (the copies included), on the CPU until the trainer moves it."""
        for p in self.parameters():
            p.requires_grad_(True)
        self.to("cpu")

    def dense_pe(self) -> torch.Tensor:
        """``(1, C, h, w)``: identical to the backbone's ``prompt_encoder.get_dense_pe()``."""
        return self.pe_layer(self.embedding_shape[1:]).unsqueeze(0)


def pe_windows(pe: torch.Tensor, size: tuple[int, int], origin: torch.Tensor | None) -> torch.Tensor:
    """Windows of a whole grid's positional encoding ``(1, C, H, W)`` at ``origin`` ``(B, 2)`` cells.

    ``origin=None``: the grid's top-left ``size`` window, shape ``(1, C, h, w)``; else ``(B, C, h, w)``.
    """
    h, w = size
    if origin is None:
        return pe[..., :h, :w]
    return torch.stack([pe[0, :, int(r):int(r) + h, int(c):int(c) + w] for r, c in origin.tolist()])


def group_norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, GroupNorm, GELU: batch-size independent (training batches hold 1-8 slices)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), group_norm(c_out), nn.GELU())
