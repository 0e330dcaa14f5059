"""H-SAM's hierarchical two-stage prompt-free decoder (Cheng et al., CVPR 2024), rebuilt on the frozen embedding.

Stage 1 is a SAM mask decoder without prompts, one token per class, initialised from the
backbone's decoder (transformer, 4x upscaling, no-mask embedding, positional encoding; SAM's
block order kept: token self-attention, token->image, MLP, image->token). Its logits ``M1`` give
the prior ``P = softmax(M1)`` on the embedding grid.

Stage 2 has fresh class tokens of its own and three parts, each switched on or off by a flag (the
benchmark's ablation). **Defaults: mask attention on, MASA and the hierarchical pixel decoder off,
and one two-way layer in stage 2** (``stage2_layers=1``, the backbone's first; SAM has two). That is
what measured best on the MNI152 benchmark (docs/benchmarks.md, "H-SAM and ESP-MedSAM heads"): with
one to three labelled slices and 150 steps, MASA's and the fusion's new weights cost Dice (one seed at
coronal k = 3: 0.796 without MASA, 0.785 without the hierarchy, 0.759 with both), and the parts and
the second layer cost time (a k = 3 training was 5.8x the cnn head's; the target is 3x). H-SAM's
full decoder is ``masa=True, hierarchical=True, stage2_layers=2``.

``mask_attention``
    Both cross-attentions of stage 2's two-way transformer are modulated by the prior:
    ``g * log P_k(pixel)`` is added to the attention scores between class token ``k`` and a pixel
    (a soft mask, i.e. the original's multiplication of the weights by ``P`` followed by
    renormalisation), with a learnable gain ``g`` per head and attention (initially 1). It works at
    any token count; the original silently turns it off unless the grid has 196 or 1024 tokens.
``masa``
    Class-balanced mask-guided re-weighting of the embedding. The class-to-pixel similarities of
    stage 1 (class token . image token) are pooled to a ``masa_grid`` x ``masa_grid`` map per class,
    refined by a self-attention across the classes (feature size ``masa_grid**2``: 0.5M parameters
    at 16, where attention over the full 64x64 maps, as the original does, would need 151M), upsampled
    and added back; ``A = sum_k w_k sigmoid(R_k)`` with ``w_k`` proportional to the inverse area of
    class ``k`` in the prior (so a small structure counts as much as the background) and
    ``E <- E + gamma * E * A`` (``gamma`` per channel, initially 1). The original takes a softmax
    over a single channel, which makes its map identically 1 (``E <- 2E``) and its weights never learn.
``hierarchical``
    The pixel decoder fuses stage 1's and stage 2's 4x upscaled features (concatenate, 1x1 conv,
    LayerNorm, GELU, depthwise 3x3, GELU, added to stage 2's own) before stage 2's hypernetworks.
    Output resolution is the decoder's 4x grid like every head (LiteMedSAM: 256 = its input); the
    original's extra 4x would give 1024 px masks for a 256 px input.

With a flag off: plain cross-attention; ``E`` unchanged; stage 2's hypernetworks read its own
upscaled features. The prior enters the attention as an additive float mask of
``scaled_dot_product_attention`` (the fused kernel; no attention matrix is formed in Python). Loss: ``(1 - w) L1 + w L2`` with ``L = CE + Dice`` of each stage and ``w``
going from 0.6 to 0.975 over the run (H-SAM's ``0.6 ** (0.99 ** epoch)`` over 300 epochs, mapped
onto the run's progress). Output: the mean of both stages' logits (H-SAM's default "stage 3").

Differences from the H-SAM code beyond the bugs above: stage 2's transformer, upscaling and
hypernetworks also start from the backbone's decoder (H-SAM draws them at random; with one to ten
labelled slices a random 3M-parameter transformer is hard to fit); no LoRA in the encoder (it
stays frozen: the cached embeddings are reused); no embedding noise. Trained like the other heads
(windows of the grid, told where they lie for the positional encoding).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.common import LayerNorm2d
from ..registry import ModelSpec
from .base import DecoderHead, pe_windows

LOG_FLOOR = math.log(1e-4)  # the prior's log is clamped here: a certain "no" must not dominate the scores


def stage_weight(progress: float) -> float:
    """Weight of stage 2 in the loss at ``progress`` in [0, 1]: 0.6 -> 0.975 (H-SAM's schedule over 300 epochs)."""
    return 0.6 ** (0.99 ** (300.0 * min(1.0, max(0.0, float(progress)))))


def hypernetwork_product(hyper: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """``(B, K, c)`` per-class weights . ``(B, c, H, W)`` features -> ``(B, K, H, W)`` logits."""
    b, c, h, w = feats.shape
    return (hyper @ feats.reshape(b, c, h * w)).reshape(b, hyper.shape[1], h, w)


class _ClassAttention(nn.Module):
    """MASA's refinement: pre-norm self-attention + MLP across the ``K`` class maps (tokens of ``d`` = grid**2)."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, d)
        b, k, d = x.shape
        q, kk, v = self.qkv(self.norm1(x)).reshape(b, k, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, kk, v)  # (B, heads, K, d/heads)
        x = x + self.proj(a.transpose(1, 2).reshape(b, k, d))
        return x + self.mlp(self.norm2(x))


class HSamHead(DecoderHead):
    """``(B, C, h, w)`` -> stage 1 (prior) -> [MASA] -> stage 2 with [mask attention] -> [hierarchical] -> logits.

    ``backbone`` (a SamModel) gives the initial weights; without one the architecture is rebuilt
    from ``spec`` with random weights (to load a saved head into).
    """

    kind = "hsam"
    default_lr = 2e-4
    crops = True
    positional = True

    def __init__(self, *, num_classes: int, spec: ModelSpec, backbone: Any = None, mask_attention: bool = True,
                 masa: bool = False, hierarchical: bool = False, masa_grid: int = 16,
                 stage2_layers: int | None = 1) -> None:
        super().__init__(num_classes=num_classes, spec=spec,
                         config={"mask_attention": bool(mask_attention), "masa": bool(masa),
                                 "hierarchical": bool(hierarchical), "masa_grid": int(masa_grid),
                                 "stage2_layers": None if stage2_layers is None else int(stage2_layers)})
        dec, prompt_encoder = self.decoder_parts(spec, backbone)
        c = self.embedding_shape[0]
        k = self.num_classes
        n_src = dec.mask_tokens.weight.shape[0]
        pick = [i % n_src for i in range(k)]
        src_tokens = dec.mask_tokens.weight.detach()
        # stage 1: SAM's decoder without prompts, one token per class
        self.transformer1 = copy.deepcopy(dec.transformer)
        self.upscaling1 = copy.deepcopy(dec.output_upscaling)
        self.tokens1 = nn.Parameter(src_tokens[pick].clone())  # (K, C)
        self.hyper1 = nn.ModuleList(copy.deepcopy(dec.output_hypernetworks_mlps[i]) for i in pick)
        self.copy_prompt_encoding(prompt_encoder)
        # stage 2: fresh class tokens (drawn with the spread of SAM's mask tokens)
        self.transformer2 = copy.deepcopy(dec.transformer)
        if stage2_layers is not None:  # the first n two-way layers of the backbone's (SAM's order kept)
            if not 1 <= int(stage2_layers) <= len(self.transformer2.layers):
                raise ValueError(f"stage2_layers must be 1..{len(self.transformer2.layers)}, got {stage2_layers}")
            self.transformer2.layers = self.transformer2.layers[:int(stage2_layers)]
        self.upscaling2 = copy.deepcopy(dec.output_upscaling)
        self.tokens2 = nn.Parameter(torch.randn(k, c) * src_tokens.std())
        self.hyper2 = nn.ModuleList(copy.deepcopy(dec.output_hypernetworks_mlps[i]) for i in pick)
        heads = self.transformer2.layers[0].cross_attn_token_to_image.num_heads
        depth = len(self.transformer2.layers)
        if mask_attention:  # gains of the prior in each cross-attention: token->image (+ final), image->token
            self.gain_t2i = nn.Parameter(torch.ones(depth + 1, heads))
            self.gain_i2t = nn.Parameter(torch.ones(depth, heads))
        if masa:
            self.masa_grid = int(masa_grid)
            self.masa_attn = _ClassAttention(self.masa_grid ** 2)
            self.masa_gamma = nn.Parameter(torch.ones(c))
        c8 = self.upscaling2[-2].out_channels
        if hierarchical:
            self.fuse = nn.Sequential(nn.Conv2d(2 * c8, c8, kernel_size=1), LayerNorm2d(c8), nn.GELU(),
                                      nn.Conv2d(c8, c8, kernel_size=3, padding=1, groups=c8), nn.GELU())
        self.make_trainable()

    # -------------------------------------------------------------------------------- the stages

    def _stage1(self, src: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, c, h, w = src.shape
        tokens = self.tokens1.unsqueeze(0).expand(b, -1, -1)
        hs, keys = self.transformer1(src, pe, tokens)  # (B, K, C), (B, hw, C)
        up = self.upscaling1(keys.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.hyper1)], dim=1)  # (B, K, C/8)
        return hypernetwork_product(hyper, up), up, hs, keys

    def _masa(self, src: torch.Tensor, hs: torch.Tensor, keys: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
        b, c, h, w = src.shape
        k, g = self.num_classes, self.masa_grid
        sim = (hs @ keys.transpose(1, 2)).reshape(b, k, h, w) / math.sqrt(c)  # class-to-pixel similarity
        coarse = F.adaptive_avg_pool2d(sim, g).reshape(b, k, g * g)
        refined = self.masa_attn(coarse).reshape(b, k, g, g) - coarse.reshape(b, k, g, g)
        r = sim + F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)  # (B, K, h, w)
        area = log_prior.detach().exp().mean(dim=(2, 3))  # (B, K) each class's share of the prior
        balance = 1.0 / (area + 1e-3)
        balance = balance / balance.sum(1, keepdim=True)
        gate = (balance[:, :, None, None] * torch.sigmoid(r)).sum(1, keepdim=True)  # (B, 1, h, w) in (0, 1)
        return src + self.masa_gamma.view(1, c, 1, 1) * src * gate

    def _stage2(self, src: torch.Tensor, pe: torch.Tensor, log_prior: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Stage 2's two-way transformer, SAM's block order, with the prior added to the cross-attention scores."""
        b, c, h, w = src.shape
        tr = self.transformer2
        keys = src.flatten(2).transpose(1, 2)  # (B, hw, C)
        key_pe = pe.flatten(2).transpose(1, 2).expand(b, -1, -1)
        tok = self.tokens2.unsqueeze(0).expand(b, -1, -1)  # (B, K, C): also the queries' positional part
        lp = log_prior.flatten(2).unsqueeze(1) if self.config["mask_attention"] else None  # (B, 1, K, hw)

        def t2i_bias(i: int) -> torch.Tensor | None:
            return None if lp is None else self.gain_t2i[i].view(1, -1, 1, 1) * lp

        def i2t_bias(i: int) -> torch.Tensor | None:
            return None if lp is None else self.gain_i2t[i].view(1, -1, 1, 1) * lp.transpose(-1, -2)

        q = tok
        for i, layer in enumerate(tr.layers):
            q = layer.attend_tokens(q, tok)
            qq, kk = q + tok, keys + key_pe
            q = layer.norm2(q + layer.cross_attn_token_to_image(qq, kk, keys, attn_bias=t2i_bias(i)))
            q = layer.norm3(q + layer.mlp(q))
            qq = q + tok
            keys = layer.norm4(keys + layer.cross_attn_image_to_token(kk, qq, q, attn_bias=i2t_bias(i)))
        qq, kk = q + tok, keys + key_pe
        q = tr.norm_final_attn(q + tr.final_attn_token_to_image(qq, kk, keys, attn_bias=t2i_bias(len(tr.layers))))
        up = self.upscaling2(keys.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        return q, up

    def stages(self, embedding: torch.Tensor, origin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stages' logits ``(B, K, 4h, 4w)``: (stage 1, stage 2)."""
        b, c, h, w = embedding.shape
        src = embedding + self.no_mask_embed.view(1, c, 1, 1)
        pe = pe_windows(self.dense_pe(), (h, w), origin).to(src.dtype)
        m1, up1, hs1, keys1 = self._stage1(src, pe)
        scale = m1.shape[-1] // w
        log_prior = torch.log_softmax(F.avg_pool2d(m1, scale), dim=1).clamp_min(LOG_FLOOR)  # (B, K, h, w)
        src2 = self._masa(src, hs1, keys1, log_prior) if self.config["masa"] else src
        hs2, up2 = self._stage2(src2, pe, log_prior)
        feats = up2 + self.fuse(torch.cat([up1, up2], dim=1)) if self.config["hierarchical"] else up2
        hyper = torch.stack([mlp(hs2[:, i]) for i, mlp in enumerate(self.hyper2)], dim=1)
        return m1, hypernetwork_product(hyper, feats)

    def forward(self, embedding: torch.Tensor, image: torch.Tensor | None = None,
                origin: torch.Tensor | None = None) -> torch.Tensor:
        m1, m2 = self.stages(embedding, origin)
        return 0.5 * (m1 + m2)

    def training_forward(self, embedding: torch.Tensor, image: torch.Tensor | None = None, *,
                         origin: torch.Tensor | None = None) -> Any:
        return self.stages(embedding, origin)

    def loss(self, outputs: Any, target: torch.Tensor, progress: float, *, dice_weight: float = 1.0) -> torch.Tensor:
        from ..finetune import segmentation_loss

        m1, m2 = outputs
        w = stage_weight(progress)
        return ((1.0 - w) * segmentation_loss(m1, target, dice_weight=dice_weight)
                + w * segmentation_loss(m2, target, dice_weight=dice_weight))
