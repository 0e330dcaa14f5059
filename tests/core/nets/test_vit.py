"""core/nets/vit.py: the global blocks' attention by bands of query rows equals the whole."""

from __future__ import annotations

import pytest
import torch

from napari_medsam.core.nets import vit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 6, 8])  # 6 does not divide the 20-row grid: a short last band
def test_global_attention_by_query_rows_is_bit_identical(monkeypatch, dtype, rows):
    torch.manual_seed(0)
    attn = vit.Attention(48, 4, (20, 20))
    with torch.no_grad():  # non-zero relative positions, so the mask matters
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    attn = attn.to(dtype)
    x = torch.randn(2, 20, 20, 48, dtype=dtype)
    monkeypatch.setattr(vit, "BF16_PRODUCT_ATTENTION", False)  # the fused kernel's bands in bf16 too
    with torch.inference_mode():
        monkeypatch.setattr(vit, "GLOBAL_ROWS", 0)
        whole = attn(x)
        monkeypatch.setattr(vit, "GLOBAL_ROWS", rows)
        banded = attn(x)
    assert torch.equal(whole, banded)


def test_training_path_keeps_autograd(monkeypatch):
    monkeypatch.setattr(vit, "GLOBAL_ROWS", 4)
    attn = vit.Attention(16, 2, (8, 8))
    x = torch.randn(1, 8, 8, 16)
    attn(x).sum().backward()
    assert attn.rel_pos_h.grad is not None and attn.qkv.weight.grad is not None


@pytest.mark.parametrize("size", [(7, 7), (20, 20)])  # a window (whole) and a global grid (bands of rows)
def test_bf16_products_attention_is_as_close_to_fp32_as_the_fused_kernel(monkeypatch, size):
    torch.manual_seed(0)
    attn = vit.Attention(64, 2, size)
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(2, *size, 64)
    monkeypatch.setattr(vit, "PRODUCT_ROWS", 6)
    with torch.inference_mode():
        ref = attn(x)
        errs = {}
        for flag in (False, True):
            monkeypatch.setattr(vit, "BF16_PRODUCT_ATTENTION", flag)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                errs[flag] = (attn(x).float() - ref).abs().max().item()
    assert errs[True] < 0.05 * ref.abs().max().item()
    assert errs[True] < 2 * errs[False] + 1e-3


def _small_encoder() -> vit.ImageEncoderViT:
    torch.manual_seed(0)
    enc = vit.ImageEncoderViT(img_size=96, patch_size=16, embed_dim=32, depth=3, num_heads=2, window_size=4,
                              global_attn_indexes=(1,), out_chans=16).eval()
    with torch.no_grad():
        enc.pos_embed.normal_(0, 0.5)
        for blk in enc.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.5)
            blk.attn.rel_pos_w.normal_(0, 0.5)
    return enc


def _reference_forward(enc: vit.ImageEncoderViT, x: torch.Tensor) -> torch.Tensor:
    """The encoder's forward with the permuted patch grid that segment-anything's has."""
    t = enc.patch_embed(x).add_(enc.pos_embed)  # (B, H, W, C) view of a (B, C, H, W) tensor
    assert not t.is_contiguous()
    for blk in enc.blocks:
        t = blk(t)
    conv1, ln1, conv2, ln2 = enc.neck
    return ln2(conv2(ln1.forward_channels_last(vit.pointwise(conv1, t)).permute(0, 3, 1, 2)))


@pytest.mark.parametrize("bf16", [False, True])
def test_blocks_get_a_contiguous_token_grid_and_fp32_is_bit_identical(bf16):
    enc = _small_encoder()
    x = torch.randn(1, 3, 96, 96)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous())) for b in enc.blocks]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = enc(x)
    for h in hooks:
        h.remove()
    # a permuted grid stayed permuted through the residual adds: every layer norm copied it first
    assert seen == [True] * len(enc.blocks)
    if not bf16:
        with torch.inference_mode():
            assert torch.equal(y, _reference_forward(enc, x))


def _attention_inputs(b: int, n: int, h: int, w: int, hd: int = 16, dtype=torch.float32):
    torch.manual_seed(1)
    q, k, v = (torch.randn(b, n, h * w, hd, dtype=dtype) for _ in range(3))
    bias_h = torch.randn(b, n, h, w, h, dtype=dtype)
    bias_w = torch.randn(b, n, h, w, w, dtype=dtype)
    return q, k, v, bias_h, bias_w


def _explicit_attention(q, k, v, bias_h, bias_w):
    b, n, h, w, _ = bias_h.shape
    bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, n, h * w, h * w)
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias, -1) @ v


@pytest.mark.parametrize("windows", [1, 3])  # 3 does not divide the 5 windows: a short last call
def test_bias_folded_into_the_product_is_the_biased_softmax(windows):
    args = _attention_inputs(5, 3, 4, 6)
    out = vit._folded_bias_attention(*args, windows)
    assert torch.allclose(out, _explicit_attention(*args), atol=1e-5, rtol=1e-5)


def test_bf16_windows_take_the_folded_bias_and_are_as_close_to_fp32_as_before(monkeypatch):
    torch.manual_seed(0)
    attn = vit.Attention(64, 2, (14, 14))
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(6, 14, 14, 64)
    calls = []
    folded = vit._folded_bias_attention
    monkeypatch.setattr(vit, "_folded_bias_attention", lambda *a: calls.append(1) or folded(*a))
    with torch.inference_mode():
        ref = attn(x)
        errs = {}
        for tokens in (0, 196):  # 0: every grid by the products with the bias added after (the old path)
            monkeypatch.setattr(vit, "FOLDED_BIAS_TOKENS", tokens)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                errs[tokens] = (attn(x).float() - ref).abs().max().item()
    assert calls == [1]
    assert errs[196] < 0.05 * ref.abs().max().item()
    assert errs[196] < 1.5 * errs[0] + 1e-3


@pytest.mark.parametrize("rows", [1, 2, 5])  # 2 does not divide the 5-row grid: a short last band
def test_head_bands_are_the_biased_softmax(rows):
    args = _attention_inputs(2, 3, 5, 6)
    out = vit._head_band_attention(*args, rows)
    assert torch.allclose(out, _explicit_attention(*args), atol=1e-5, rtol=1e-5)


def test_bf16_global_grid_takes_the_head_bands(monkeypatch):
    attn = vit.Attention(32, 2, (20, 20))
    calls = []
    bands = vit._head_band_attention
    monkeypatch.setattr(vit, "_head_band_attention", lambda *a: calls.append(a[-1]) or bands(*a))
    monkeypatch.setattr(vit, "PRODUCT_ROWS", 6)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn(torch.randn(1, 20, 20, 32))
    assert calls == [6]


@pytest.mark.parametrize("grid", [6, 8])  # 6: windows of 4 with padding; 8: none
def test_window_blocks_one_copy_each_way_equal_the_partition_path(monkeypatch, grid):
    enc = _small_encoder()
    blk = enc.blocks[0]
    x = torch.randn(2, grid, grid, 32)
    with torch.inference_mode():
        out = {}
        for flag in (False, True):  # False: pad, partition, attention + projection, unpartition, crop
            monkeypatch.setattr(vit, "WINDOW_LAYOUT_COPIES", flag)
            out[flag] = blk(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out[flag, "bf16"] = blk(x)
    assert torch.equal(out[True], out[False])  # fp32: bit-identical
    assert (out[True, "bf16"] - out[False, "bf16"]).abs().max() < 0.02 * out[False].abs().max()
    assert (out[True, "bf16"] - out[False]).abs().max() < 0.05 * out[False].abs().max()


def test_windows_and_back_are_the_partition_and_its_inverse():
    x = torch.randn(2, 6, 7, 5)
    w = vit._to_windows(x, 4, x.dtype)
    ref, pad_hw = vit._window_partition(x, 4)
    assert torch.equal(w, ref)
    o = w.reshape(w.shape[0], 16, 1, 5).transpose(1, 2)  # as the attention's (B * windows, heads, ws * ws, hd)
    assert torch.equal(vit._from_windows(o, 4, 2, 6, 7), vit._window_unpartition(w, 4, pad_hw, (6, 7)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_in_place_equals_the_softmax(dtype):
    s = torch.randn(2, 3, 50, 4096).mul_(4).to(dtype)
    ref = torch.softmax(s, -1)
    ptr = s.data_ptr()
    out = vit._softmax_(s)
    assert out.data_ptr() == ptr  # written into the scores' own buffer
    assert torch.equal(out, ref)


def test_bf16_attention_pieces_take_the_softmax_in_place(monkeypatch):
    calls = []
    soft = vit._softmax_
    monkeypatch.setattr(vit, "_softmax_", lambda s: calls.append(s.data_ptr()) or soft(s))
    monkeypatch.setattr(vit, "PRODUCT_ROWS", 6)
    glob, win = vit.Attention(32, 2, (20, 20)), vit.Attention(32, 2, (4, 4))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        glob(torch.randn(1, 20, 20, 32))  # global: 2 heads x 4 bands (6, 6, 6, 2 rows)
        win(torch.randn(3, 4, 4, 32))  # windows: one call each
    assert len(calls) == 2 * 4 + 3
    assert len(set(calls[:8])) == 1  # the head bands' one reused score buffer
