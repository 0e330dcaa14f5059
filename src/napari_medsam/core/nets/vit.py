"""SAM's ViT image encoder (ViT-B/L/H), parameter names matching the segment-anything checkpoints.

Windowed attention with decomposed relative positions in most blocks, global attention in a few,
then a 256-channel conv neck. Input ``(B, 3, 1024, 1024)`` -> ``(B, 256, 64, 64)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock, bf16_autocast_inference, linear
from .common import softmax_ as _softmax_
from .tiny_vit import pointwise


def _get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        rel_pos = F.interpolate(rel_pos.T[None], size=max_dist, mode="linear")[0].T
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[rel.long()]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))
        self.lora = None  # optional hook: a nets.adapters.LoRAQV adding low-rank q and v updates

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, _ = x.shape
        return linear(self.proj, self.attend(x).transpose(1, 2).reshape(b, h, w, -1))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, heads, H * W, head_dim)``: the attention before its heads are merged
        and projected."""
        b, h, w, _ = x.shape
        n, hd = self.num_heads, self.head_dim
        qkv = linear(self.qkv, x)
        if self.lora is not None:
            qkv = self.lora(x, qkv)
        qkv = qkv.reshape(b, h * w, 3, n, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, HW, hd), views into qkv
        rh = _get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)  # (h, h, hd)
        rw = _get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)
        r_q = q.reshape(b, n, h, w, hd)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)  # (B, heads, h, w, h)
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)  # (B, heads, h, w, w)
        # fused kernel (fp32, GPUs): the (HW x HW) bias written once, contiguous: the sum of the two
        # non-contiguous einsum outputs came out strided and its reshape was a second full copy
        # (805 MB in fp32 for a global ViT-B block). A global block's bias goes by bands of query
        # rows (GLOBAL_ROWS), which measured faster than the whole one; windows keep the one bias.
        # bf16 on a CPU: two products and a softmax in cache-sized pieces (BF16_PRODUCT_ATTENTION).
        if torch.is_grad_enabled() and bias_h.requires_grad:  # training adapters: out= has no autograd
            bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, n, h * w, h * w)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        elif BF16_PRODUCT_ATTENTION and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            if h * w <= FOLDED_BIAS_TOKENS:
                out = _folded_bias_attention(q, k, v, bias_h, bias_w, WINDOWS_PER_CALL)
            else:
                out = _head_band_attention(q, k, v, bias_h, bias_w, min(h, PRODUCT_ROWS))
        elif GLOBAL_ROWS and h > GLOBAL_ROWS:
            out = _banded_attention(q, k, v, bias_h, bias_w, GLOBAL_ROWS)
        else:
            bias = torch.empty(b, n, h, w, h, w, dtype=q.dtype, device=q.device)
            bias = torch.add(bias_h[..., :, None], bias_w[..., None, :], out=bias).view(b, n, h * w, h * w)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out


#: query rows per call of the fused kernel in a global block at inference (None / 0: all at once).
#: The (HW x HW) bias of a global ViT-B block is 201 M values (402 MB in bf16); 16 of its 64 query
#: rows at a time keep it at a quarter, in one buffer reused by the four calls. Each call gives
#: the rows' outputs exactly (the kernel's rows are independent), so the result is bit-identical.
GLOBAL_ROWS = 16


#: bf16 attention on a CPU at inference as two bf16 products and a softmax, in pieces that stay in
#: cache: windows (grids of at most ``FOLDED_BIAS_TOKENS`` tokens) ``WINDOWS_PER_CALL`` at a time
#: with the relative-position bias folded into the first product (:func:`_folded_bias_attention`),
#: a global block one head and ``PRODUCT_ROWS`` query rows at a time (:func:`_head_band_attention`).
BF16_PRODUCT_ATTENTION = True
PRODUCT_ROWS = 8
WINDOWS_PER_CALL = 1
FOLDED_BIAS_TOKENS = 256


def _folded_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
                           bias_w: torch.Tensor, windows: int) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d) + bias) v with the decomposed bias inside the first product.

    The score of query (i, j) and key (r, c) is ``q.k / sqrt(d) + bias_h[i, j, r] + bias_w[i, j, c]``:
    the product of ``[q / sqrt(d), bias_h[i, j, :], bias_w[i, j, :]]`` and ``[k, onehot(r), onehot(c)]``
    (head dim d + h + w: 64 + 14 + 14 for a ViT window). One product gives the biased scores, rounded
    once; the two broadcast adds over the (hw x hw) scores that it replaces cost the windows of ViT-B
    more than their products did. ``windows`` windows per product, so the scores stay in cache (a ViT-B
    window: 12 x 196 x 196 scores, 0.9 MB in bf16); their softmax in bf16 (within a bf16 rounding of
    the fp32 one, and faster than it at this size: 1.06 against 1.36 ns a score measured)."""
    b, n, h, w, _ = bias_h.shape
    hd = q.shape[-1]
    qa = torch.empty(b, n, h * w, hd + h + w, dtype=q.dtype, device=q.device)
    torch.mul(q, hd ** -0.5, out=qa[..., :hd])  # (B, heads, hw, hd + h + w)
    qa[..., hd:hd + h].view(b, n, h, w, h).copy_(bias_h)
    qa[..., hd + h:].view(b, n, h, w, w).copy_(bias_w)
    ka = torch.empty_like(qa)
    ka[..., :hd] = k
    ka[..., hd:] = _one_hot_rows_cols(h, w, q.dtype, q.device)  # (hw, h + w), the same for every key set
    out = torch.empty(b, n, h * w, hd, dtype=q.dtype, device=q.device)
    for i in range(0, b, windows):
        a = torch.matmul(qa[i:i + windows], ka[i:i + windows].transpose(-1, -2))  # (windows, heads, hw, hw)
        torch.matmul(_softmax_(a), v[i:i + windows], out=out[i:i + windows])
    return out


def _one_hot_rows_cols(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(h * w, h + w)``: row ``r * w + c`` is one at ``r`` and at ``h + c``."""
    idx = torch.arange(h * w, device=device)
    m = torch.zeros(h * w, h + w, dtype=dtype, device=device)
    m[idx, idx // w] = 1
    m[idx, h + idx % w] = 1
    return m


def _head_band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
                         bias_w: torch.Tensor, rows: int) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d) + bias) v, one head and ``rows`` query rows of the grid at a time.

    Each piece's bias (rows * w, hw) is summed into one reused buffer and the first product is
    accumulated onto it in place (``addmm_``: the add costs nothing inside the product, the scores are
    rounded once); the softmax (bf16: bit-identical to the fp32 one rounded, at rows of 4096 keys) runs
    on the piece while it is in cache (a ViT-B global block: 512 x 4096 scores, 4 MB in bf16, against
    50 MB for all 12 heads' band of 8 rows, whose elementwise passes then streamed from memory)."""
    b, n, h, w, _ = bias_h.shape
    hd = q.shape[-1]
    out = torch.empty(b, n, h * w, hd, dtype=q.dtype, device=q.device)
    buf = torch.empty(rows, w, h, w, dtype=q.dtype, device=q.device)
    qs = q * hd ** -0.5  # (B, heads, hw, hd)
    for bi in range(b):
        for i in range(n):
            kt, vi = k[bi, i].transpose(0, 1), v[bi, i]  # (hd, hw), (hw, hd)
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                s = torch.add(bias_h[bi, i, r0:r1, :, :, None], bias_w[bi, i, r0:r1, :, None, :], out=buf[:r1 - r0])
                s = s.view((r1 - r0) * w, h * w).addmm_(qs[bi, i, r0 * w:r1 * w], kt)
                torch.matmul(_softmax_(s), vi, out=out[bi, i, r0 * w:r1 * w])
    return out


def _banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
                      bias_w: torch.Tensor, rows: int) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d) + bias) v by the fused kernel, ``rows`` query rows of the grid at a time.

    ``bias_h`` (B, heads, h, w, h) and ``bias_w`` (B, heads, h, w, w) are the decomposed relative
    positions; each band's bias is summed into one reused buffer. The band's outputs are exact:
    bit-identical to the whole at once."""
    b, n, h, w, _ = bias_h.shape
    hd = q.shape[-1]
    out = torch.empty(b, n, h * w, hd, dtype=q.dtype, device=q.device)
    buf = torch.empty(b, n, rows, w, h, w, dtype=q.dtype, device=q.device)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        bh, bw = bias_h[:, :, r0:r1, :, :, None], bias_w[:, :, r0:r1, :, None, :]
        m = torch.add(bh, bw, out=buf[:, :, :r1 - r0])
        out[:, :, r0 * w:r1 * w] = F.scaled_dot_product_attention(
            q[:, :, r0 * w:r1 * w], k, v, attn_mask=m.view(b, n, (r1 - r0) * w, h * w))
    return out


def _window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    b, h, w, c = x.shape
    pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
    return x, (hp, wp)


#: window blocks at inference without copies beyond the two that change the layout: the normed
#: grid goes into its padded windows in one copy (cast to bf16 there under bf16 autocast on a CPU,
#: where the qkv product takes bf16), and the attention's heads are merged, its windows undone and
#: its padding cropped in one copy before the output projection (which then runs on the grid's
#: tokens only: 4096 of ViT-B's 4900 padded ones). Before: pad, permute, cast; merge heads, project,
#: permute back, crop: three more passes over the block's tokens. False: that path (tests).
WINDOW_LAYOUT_COPIES = True


def _window_pieces(h: int, w: int, ws: int) -> list[tuple[slice, slice, int, int]]:
    """The (rows, cols) pieces of an (h, w) grid that each map onto a block of its ws-windows:
    ``(window-row slice, window-col slice, rows per window, cols per window)``: the full windows,
    then the partial last row / column of windows (padding)."""
    def axis(n: int) -> list[tuple[slice, int]]:
        full = [(slice(0, n // ws), ws)] if n >= ws else []
        return full + ([(slice(n // ws, n // ws + 1), n % ws)] if n % ws else [])
    return [(r, c, nr, nc) for r, nr in axis(h) for c, nc in axis(w)]


def _grid_piece(grid: torch.Tensor, wr: slice, wc: slice, nr: int, nc: int, ws: int) -> torch.Tensor:
    """``grid`` (B, h, w, ...) rows / cols of windows ``wr`` / ``wc`` as (B, windows, nr, windows, nc, ...)."""
    g = grid[:, wr.start * ws:wr.start * ws + (wr.stop - wr.start) * nr,
             wc.start * ws:wc.start * ws + (wc.stop - wc.start) * nc]
    return g.unflatten(1, (wr.stop - wr.start, nr)).unflatten(3, (wc.stop - wc.start, nc))


def _to_windows(x: torch.Tensor, ws: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, h, w, C)`` -> ``(B * windows, ws, ws, C)`` in ``dtype``, zero-padded: one copy."""
    b, h, w, c = x.shape
    nh, nw = -(-h // ws), -(-w // ws)
    buf = torch.empty(b, nh, nw, ws, ws, c, dtype=dtype, device=x.device)
    win = buf.permute(0, 1, 3, 2, 4, 5)  # (B, nh, ws, nw, ws, C): the padded grid
    if h % ws:
        win[:, -1, h % ws:] = 0
    if w % ws:
        win[:, :, :, -1, w % ws:] = 0
    for wr, wc, nr, nc in _window_pieces(h, w, ws):
        win[:, wr, :nr, wc, :nc].copy_(_grid_piece(x, wr, wc, nr, nc, ws))
    return buf.view(b * nh * nw, ws, ws, c)


def _from_windows(o: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    """The attention ``o`` (B * windows, heads, ws * ws, hd) of padded windows -> ``(B, h, w, heads * hd)``:
    heads merged, windows undone and the padding cropped in one copy."""
    n, hd = o.shape[1], o.shape[3]
    nh, nw = -(-h // ws), -(-w // ws)
    win = o.view(b, nh, nw, n, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6)  # (B, nh, ws, nw, ws, heads, hd)
    out = torch.empty(b, h, w, n * hd, dtype=o.dtype, device=o.device)
    grid = out.view(b, h, w, n, hd)
    for wr, wc, nr, nc in _window_pieces(h, w, ws):
        _grid_piece(grid, wr, wc, nr, nc, ws).copy_(win[:, wr, :nr, wc, :nc])
    return out


def _window_unpartition(x: torch.Tensor, ws: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    hp, wp = pad_hw
    h, w = hw
    b = x.shape[0] // (hp * wp // ws // ws)
    x = x.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w].contiguous() if (hp > h or wp > w) else x


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int,
                 input_size: tuple[int, int]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        size = (window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(dim, num_heads, size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.adapter = None  # optional hook: a nets.adapters.BlockAdapter (None: the plain block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        normed = x
        ad = self.adapter
        if self.window_size > 0 and ad is None and WINDOW_LAYOUT_COPIES and not torch.is_grad_enabled():
            b, h, w, _ = x.shape
            ws = self.window_size
            o = self.attn.attend(_to_windows(x, ws, torch.bfloat16 if bf16_autocast_inference(x) else x.dtype))
            x = linear(self.attn.proj, _from_windows(o, ws, b, h, w))  # (B, h, w, C)
        elif self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = _window_partition(x, self.window_size)
            x = self.attn(x)
            x = _window_unpartition(x, self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        if ad is not None:  # on the whole token grid, after un-windowing (SD-Trans never sees windows)
            x = ad.after_attention(self.attn, normed, x)
        if ad is not None:
            x = shortcut + x
            n2 = self.norm2(x)
            return x + ad.beside_mlp(n2, self.mlp(n2))
        if torch.is_grad_enabled() and (shortcut.requires_grad or x.requires_grad):
            x = shortcut + x
            return x + self.mlp(self.norm2(x))
        # inference: the residual adds in place on this block's own temporaries, never on its input;
        # the residual stream keeps its dtype (fp32 under autocast, where attention gives bf16)
        x = x.add_(shortcut) if x.dtype == shortcut.dtype else shortcut + x
        return x.add_(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C)


class ImageEncoderViT(nn.Module):
    def __init__(self, *, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int,
                 depth: int, num_heads: int, mlp_ratio: float = 4.0, out_chans: int = 256,
                 window_size: int = 14, global_attn_indexes: tuple[int, ...]) -> None:
        super().__init__()
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, 0 if i in global_attn_indexes else window_size, (grid, grid))
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, H, W, C), a permuted view of the conv's (B, C, H, W) output
        if not torch.is_grad_enabled():
            # the token grid made contiguous by the pos-embed add itself (fp32 under autocast, whose
            # conv gives bf16): a permuted grid stayed permuted through every residual add after it,
            # and each layer norm copied it to contiguous first (24 copies a ViT-B slice)
            dtype = torch.result_type(x, self.pos_embed)
            x = torch.add(x, self.pos_embed, out=torch.empty(x.shape, dtype=dtype, device=x.device))
        else:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        conv1, ln1, conv2, ln2 = self.neck
        # the 1x1 conv on the channels-last tokens (or the int8 linear that core.speed puts in its place)
        y = ln1.forward_channels_last(pointwise(conv1, x))  # (B, H, W, 256)
        return ln2(conv2(y.permute(0, 3, 1, 2)))  # (B, 256, H, W)
