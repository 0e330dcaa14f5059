"""TinyViT image encoder in the LiteMedSAM / MobileSAM layout.

Written for napari-medsam from the TinyViT paper's design (MBConv stage, then windowed attention
stages with a learned relative-position bias, each followed by a depthwise "local" conv and an MLP),
with parameter names that match the published LiteMedSAM and MobileSAM checkpoints.

Input ``(B, 3, S, S)``; output ``(B, 256, S/4, S/4)`` for LiteMedSAM (S = 256, 1x1 patch embed) or
``(B, 256, S/16, S/16)`` for MobileSAM (S = 1024, two stride-2 3x3 convs in the patch embed).

Layout. Inside the network every activation is a contiguous channels-last ``(B, H, W, C)`` tensor
(the checkpoints' NCHW conv weights are used as they are): a 1x1 conv is one matrix multiply over
the pixels (:func:`pointwise`); a depthwise or strided conv runs on the zero-copy
``permute(0, 3, 1, 2)`` view, a channels-last NCHW tensor that oneDNN convolves without
reordering; the attention stages need no transposes at all. The attention bias goes to
``scaled_dot_product_attention`` as a 4D mask, which selects PyTorch's fused CPU kernel instead of
the unfused "math" fallback a 3D mask gets (4x faster on the attention itself). GELUs and residual
adds run in place on fresh temporaries when autograd does not need their inputs; a depthwise or
strided conv and the GELU after it are one oneDNN call at inference (:func:`conv_act`). This is
the arithmetic of the reference NCHW network, equal up to float round-off.

Banding. At full resolution (LiteMedSAM: 256 x 256 pixels, 256 hidden channels) an MBConv
activation is 64 MiB, which glibc serves as a fresh memory map that is page-faulted in on every
slice. :attr:`MBConv.band_rows` and :attr:`PatchMerging.band_rows` compute those blocks on bands of
rows instead (each band carries the one-row halo its 3x3 depthwise conv needs, so the result is
the same arithmetic on the same pixels); ``0`` (the default here) runs them whole.
:func:`napari_medsam.core.speed.optimize_for_inference` sets them on CPU.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, bf16_autocast_inference, bf16_weights, kept, linear, softmax_, softmax_fp32
from .common import apply_act as _act


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
        # skip_init: no draw from torch's global generator (values are overwritten below, and a draw
        # here would shift the seeded random init of a test model another thread is building)
        conv = torch.nn.utils.skip_init(nn.Conv2d, c.in_channels, c.out_channels, c.kernel_size, c.stride,
                                        c.padding, groups=c.groups, bias=True, device=c.weight.device,
                                        dtype=c.weight.dtype)
        conv.weight.copy_(c.weight * scale[:, None, None, None])
        conv.bias.copy_(bn.bias - bn.running_mean * scale)
        return conv


def _is_pointwise_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.padding == (0, 0) and m.groups == 1 and m.dilation == (1, 1))


def pointwise(m: nn.Module, x: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor:
    """Apply a conv-like layer ``m`` to channels-last tokens ``(B, H, W, C)``; returns ``(B, H', W', C')``.

    A plain 1x1 conv becomes ``F.linear`` over the tokens; any other conv (depthwise, strided,
    an unfused :class:`Conv2dBN`) runs on the channels-last NCHW view; any other module (an
    ``nn.Linear``, a quantized linear put in place of a 1x1 conv) is called on the tokens. ``act``
    (an activation module) follows, fused with a 1x1 conv where :func:`.common.linear` can.
    """
    if _is_pointwise_conv(m):
        return linear(m, x, act)
    if isinstance(m, (nn.Conv2d, Conv2dBN)):
        y = m(x.permute(0, 3, 1, 2))  # channels-last NCHW view in, channels-last NCHW out
        y = y.permute(0, 2, 3, 1).contiguous()  # a no-op when oneDNN kept channels-last
    else:
        y = m(x)
    return y if act is None else _act(act, y)


#: CPU inference: a spatial conv (3x3 depthwise, strided) and the GELU after it run as one oneDNN
#: call, the GELU applied to each output block while it is in cache (1.4x on the pair for the
#: full-resolution depthwise conv; same values up to float round-off). False: two ops (tests).
FUSE_CONV_GELU = True
_conv_pointwise_op: object = None  # torch.ops.mkldnn._convolution_pointwise, or False where missing


def _fused_conv_gelu() -> object:
    global _conv_pointwise_op
    if _conv_pointwise_op is None:
        try:
            ok = torch.backends.mkldnn.is_available()
            _conv_pointwise_op = torch.ops.mkldnn._convolution_pointwise if ok else False
        except (AttributeError, RuntimeError):
            _conv_pointwise_op = False
    return _conv_pointwise_op


def _disable_fused_conv_gelu() -> None:
    global _conv_pointwise_op
    _conv_pointwise_op = False


def conv_act(m: nn.Module, act: nn.Module, x: torch.Tensor, padding: tuple[int, int] | None = None) -> torch.Tensor:
    """``act(conv(x))`` on channels-last tokens ``(B, H, W, C)``; ``padding`` overrides the conv's.

    A spatial ``nn.Conv2d`` followed by an exact GELU, without autograd, on the CPU in fp32 or under
    bf16 autocast is one fused oneDNN call (:data:`FUSE_CONV_GELU`); anything else runs as two ops.
    """
    pad = padding if padding is not None else getattr(m, "padding", None)  # a tuple, or a string ("same")
    bf16 = bf16_autocast_inference(x)
    if (FUSE_CONV_GELU and isinstance(m, nn.Conv2d) and not _is_pointwise_conv(m) and type(act) is nn.GELU
            and act.approximate == "none" and x.device.type == "cpu" and (x.dtype == torch.float32 or bf16)
            and m.padding_mode == "zeros" and not torch.is_grad_enabled() and isinstance(pad, tuple)):
        op = _fused_conv_gelu()
        if op:
            # under bf16 autocast: bf16 in and out, on bf16 weight copies kept on the layer
            w, b = bf16_weights(m, m.weight, m.bias, flatten=False) if bf16 else (m.weight, m.bias)
            try:
                y = op(x.permute(0, 3, 1, 2).to(w.dtype), w, b, list(pad), list(m.stride),  # type: ignore[operator]
                       list(m.dilation), m.groups, "gelu", [], "none")
                return y.permute(0, 2, 3, 1).contiguous()  # a no-op: oneDNN keeps channels-last
            except (RuntimeError, NotImplementedError):  # a oneDNN build without this fusion: two ops from now on
                _disable_fused_conv_gelu()
    if padding is not None:
        y = F.conv2d(x.permute(0, 3, 1, 2), m.weight, m.bias, m.stride, padding, m.dilation, m.groups)
        return _act(act, y.permute(0, 2, 3, 1).contiguous())
    return pointwise(m, x, act)


def _add(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y + x``, in place on the fresh temporary ``y`` when autograd allows."""
    if not (y.requires_grad and torch.is_grad_enabled()) and y.shape == x.shape:
        return y.add_(x)
    return y + x


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, *, kernel: int, stride: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, kernel, stride, pad),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, kernel, stride, pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, Cin) -> (B, H', W', C)
        c1, act, c2 = self.seq
        return pointwise(c2, conv_act(c1, act, x))


class MBConv(nn.Module):
    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)
        self.act = nn.GELU()
        self.band_rows = 0  # > 0: compute in bands of this many rows (see the module docstring)

    def _block(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        y = pointwise(self.conv1, x, self.act)
        y = conv_act(self.conv2, self.act, y)[:, rows]
        return _act(self.act, _add(pointwise(self.conv3, y), x[:, rows]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        h = x.shape[1]
        band = self.band_rows
        if band <= 0 or band >= h:
            return self._block(x)
        # The 3x3 depthwise conv needs one row above and below a band; rows at the image border
        # get the conv's own zero padding, exactly as unbanded. Only the band's rows are kept.
        parts = []
        for r0 in range(0, h, band):
            r1 = min(r0 + band, h)
            lo, hi = max(r0 - 1, 0), min(r1 + 1, h)
            parts.append(self._block(x[:, lo:hi], slice(r0 - lo, r1 - lo)))
        return torch.cat(parts, dim=1)


class PatchMerging(nn.Module):
    """Channel change plus (optional) stride-2 downsampling on ``(B, H, W, C)`` tokens."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)
        self.act = nn.GELU()
        self.band_rows = 0  # > 0: compute in bands of this many output rows (fused convs only)

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        y = conv_act(self.conv2, self.act, _act(self.act, pointwise(self.conv1, x)))
        return pointwise(self.conv3, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        band, conv2 = self.band_rows, self.conv2
        h = x.shape[1]
        if band <= 0 or not isinstance(conv2, nn.Conv2d) or conv2.padding != (1, 1) or conv2.kernel_size != (3, 3):
            return self._whole(x)
        s = conv2.stride[0]
        h_out = (h - 1) // s + 1
        if band >= h_out:
            return self._whole(x)
        parts = []
        for r0 in range(0, h_out, band):
            r1 = min(r0 + band, h_out)
            # output rows r0..r1-1 read input rows s*r0 - 1 .. s*(r1-1) + 1 (zero outside the image)
            lo, hi = s * r0 - 1, s * (r1 - 1) + 2
            y = _act(self.act, pointwise(self.conv1, x[:, max(lo, 0):min(hi, h)]))
            if lo < 0 or hi > h:
                y = F.pad(y, (0, 0, 0, 0, max(-lo, 0), max(hi - h, 0)))
            parts.append(pointwise(self.conv3, conv_act(conv2, self.act, y.contiguous(), padding=(0, 1))))
        return torch.cat(parts, dim=1)


#: bf16 window attention on a CPU at inference as two products and a softmax (see below)
BF16_PRODUCT_ATTENTION = True
#: the bf16 softmax on the bf16 scores for windows of at least this many tokens, elsewhere
#: :func:`.common.softmax_fp32`; 0: softmax_fp32 everywhere
BF16_SOFTMAX_TOKENS = 0
#: > 0: the bf16 path in pieces of windows of about this many scores, the bias inside the first
#: product (:func:`_folded_bias_attention`); 0: whole-batch products and a separate bias add.
#: Both off: measured within the noise on LiteMedSAM (1.00-1.04x) and lower box-mask IoU vs fp32
#: (docs/benchmarks.md, helper L18; ``benchmarks/bench_tinyvit_ab.py --ab``)
FOLDED_BIAS_SCORES = 0


def _softmax(s: torch.Tensor) -> torch.Tensor:
    t = BF16_SOFTMAX_TOKENS
    if 0 < t <= s.shape[-1]:
        return softmax_(s)  # in place: ``s`` is a fresh or reused buffer of scores
    return softmax_fp32(s)


def _folded_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                           scale: float, windows: int) -> torch.Tensor:
    """Softmax(q k^T * scale + bias) v on ``(B*, heads, N, hd)`` windows, ``windows`` at a time.

    Each piece's scores start as the ``(heads, N, N)`` bias, broadcast into a reused buffer, and the
    first product is accumulated onto them (``baddbmm``: one rounding, no separate pass over the
    scores); the softmax and the second product run on the piece while it is in cache."""
    b, nh, n, hd = q.shape
    out = torch.empty(b, n, nh, hd, dtype=q.dtype, device=q.device)  # (B*, N, heads, hd): the proj's layout
    buf = torch.empty(windows, nh, n, n, dtype=q.dtype, device=q.device)
    for i in range(0, b, windows):
        j = min(b, i + windows)
        s = buf[:j - i]
        s.copy_(bias)
        s = s.view(-1, n, n).baddbmm_(q[i:j].reshape(-1, n, hd), k[i:j].reshape(-1, n, hd).transpose(1, 2),
                                      alpha=scale)
        p = _softmax(s)
        torch.matmul(p.view(j - i, nh, n, n), v[i:j], out=out[i:j].transpose(1, 2))
    return out.transpose(1, 2)


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
        self.lora = None  # optional hook: a nets.adapters.LoRAQV adding low-rank q and v updates

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B*, N, C)
        b, n, _ = x.shape
        xn = self.norm(x)
        qkv = linear(self.qkv, xn)
        if self.lora is not None:
            qkv = self.lora(xn, qkv)
        qkv = qkv.view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=3)  # (B*, heads, N, hd) each
        bias = self._bias(q.dtype)
        if BF16_PRODUCT_ATTENTION and q.dtype == torch.bfloat16 and q.device.type == "cpu" and not torch.is_grad_enabled():
            # bf16 on a CPU: two bf16 products and a softmax beat the fused kernel on these small
            # windows (49 and 196 tokens, head dim 32), whose bf16 path is barely faster than fp32
            if FOLDED_BIAS_SCORES > 0:
                windows = max(1, FOLDED_BIAS_SCORES // (self.num_heads * n * n))
                out = _folded_bias_attention(q, k, v, bias[0], self.head_dim ** -0.5, windows)
            else:
                a = torch.matmul(q * self.head_dim ** -0.5, k.transpose(-1, -2)).add_(bias)
                out = torch.matmul(_softmax(a), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return linear(self.proj, out.transpose(1, 2).reshape(b, n, -1))

    def _bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(1, heads, N, N) bias per offset; a 4D mask gets the fused CPU kernel (a 3D one the slow
        math fallback). At inference it is gathered once per dtype and kept while the parameter's
        version is unchanged."""
        p = self.attention_biases
        if torch.is_grad_enabled() and p.requires_grad:
            return p[:, self.attention_bias_idxs].to(dtype)[None]
        return kept(self, "_bias_cache", lambda: p[:, self.attention_bias_idxs].to(dtype)[None], p, extra=dtype)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.fc2, linear(self.fc1, self.norm(x), self.act))


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)
        self.adapter = None  # optional hook: a nets.adapters.BlockAdapter (None: the plain block)

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
        ad = self.adapter
        if ad is not None:  # on the whole token grid, after un-windowing (SD-Trans never sees windows)
            y = ad.after_attention(self.attn, x, y)
        x = pointwise(self.local_conv, x + y)
        if ad is not None:
            return _add(ad.beside_mlp(self.mlp.norm(x), self.mlp(x)), x)
        return _add(self.mlp(x), x)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, out_dim: int, stride: int, expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H', W', C')
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class AttnStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 out_dim: int | None, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        for blk in self.blocks:
            x = blk(x)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C, S', S')
        x = self.patch_embed(x.permute(0, 2, 3, 1).contiguous())  # (B, S', S', C0) channels-last tokens
        for layer in self.layers:
            x = layer(x)
        conv1, ln1, conv2, ln2 = self.neck
        x = ln1.forward_channels_last(pointwise(conv1, x))
        x = ln2.forward_channels_last(pointwise(conv2, x))
        return x.permute(0, 3, 1, 2).contiguous()  # (B, C, h, w), plain NCHW for the decoder


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Replace every :class:`Conv2dBN` by one biased conv (inference only; same outputs)."""
    for name, child in list(module.named_children()):
        if isinstance(child, Conv2dBN):
            setattr(module, name, child.fuse())
        else:
            fuse_conv_bn(child)
    return module
