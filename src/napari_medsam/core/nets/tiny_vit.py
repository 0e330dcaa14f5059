"""TinyViT image encoder in the LiteMedSAM / MobileSAM layout.

Written for napari-medsam from the TinyViT paper's design (MBConv stage, then windowed attention
stages with a learned relative-position bias, each followed by a depthwise "local" conv and an MLP),
with parameter names that match the published LiteMedSAM and MobileSAM checkpoints.

Input ``(B, 3, S, S)``; output ``(B, 256, S/4, S/4)`` for LiteMedSAM (S = 256, 1x1 patch embed) or
``(B, 256, S/16, S/16)`` for MobileSAM (S = 1024, two stride-2 3x3 convs in the patch embed).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class Conv2dBN(nn.Sequential):
    """Conv (no bias) + BatchNorm, named ``c`` and ``bn``; :meth:`fuse` folds them for inference."""

    def __init__(self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups,
                         bias=True, device=c.weight.device, dtype=c.weight.dtype)
        conv.weight.copy_(c.weight * scale[:, None, None, None])
        conv.bias.copy_(bn.bias - bn.running_mean * scale)
        return conv


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, *, kernel: int, stride: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, kernel, stride, pad),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, kernel, stride, pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Channel change plus (optional) stride-2 downsampling; works on ``(B, C, H, W)``."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Multi-head attention inside a window with a learned bias per relative offset."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        n = len(points)
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(n, n),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B*, N, C)
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=3)  # (B*, heads, N, hd) each
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) channels-last tokens
        b, h, w, c = x.shape
        ws = self.window
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        y = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if (pad_b or pad_r) else x
        ph, pw = h + pad_b, w + pad_r
        y = y.view(b, ph // ws, ws, pw // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        y = self.attn(y)
        y = y.view(b, ph // ws, pw // ws, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            y = y[:, :h, :w]
        x = x + y
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, out_dim: int, stride: int, expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C', H', W')
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class AttnStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 out_dim: int | None, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT encoder with SAM's 256-channel neck."""

    def __init__(self, *, in_chans: int = 3, embed_dims: tuple[int, ...], depths: tuple[int, ...],
                 num_heads: tuple[int, ...], window_sizes: tuple[int, ...], mlp_ratio: float = 4.0,
                 patch_kernel: int, patch_stride: int, merge_strides: tuple[int, ...],
                 mbconv_expand_ratio: float = 4.0, out_chans: int = 256) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], kernel=patch_kernel, stride=patch_stride)
        layers: list[nn.Module] = [ConvStage(embed_dims[0], depths[0], embed_dims[1], merge_strides[0],
                                             mbconv_expand_ratio)]
        last = len(depths) - 1
        for i in range(1, len(depths)):
            layers.append(AttnStage(embed_dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio,
                                    embed_dims[i + 1] if i < last else None,
                                    merge_strides[i] if i < last else 1))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Replace every :class:`Conv2dBN` by one biased conv (inference only; same outputs)."""
    for name, child in list(module.named_children()):
        if isinstance(child, Conv2dBN):
            setattr(module, name, child.fuse())
        else:
            fuse_conv_bn(child)
    return module
