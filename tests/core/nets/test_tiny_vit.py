"""core/nets/tiny_vit.py: the window attention's inference paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_medsam.core.nets import tiny_vit


def _attn() -> tiny_vit.WindowAttention:
    torch.manual_seed(0)
    a = tiny_vit.WindowAttention(64, 2, 7)
    with torch.no_grad():
        a.attention_biases.normal_(0, 1.0)
    return a


def _reference(a: tiny_vit.WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """The attention written out in fp32 from the parameters (no cache, no fast path)."""
    b, n, c = x.shape
    qkv = a.qkv(a.norm(x)).view(b, n, a.num_heads, 3 * a.head_dim).permute(0, 2, 1, 3)
    q, k, v = qkv.split(a.head_dim, dim=3)
    bias = a.attention_biases[:, a.attention_bias_idxs][None]
    return a.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, c))


def test_bf16_products_path_matches_fp32_like_the_fused_kernel(monkeypatch):
    a = _attn()
    x = torch.randn(6, 49, 64)
    with torch.inference_mode():
        ref = _reference(a, x)
        errs = {}
        for flag in (False, True):
            monkeypatch.setattr(tiny_vit, "BF16_PRODUCT_ATTENTION", flag)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                errs[flag] = (a(x).float() - ref).abs().max().item()
    assert errs[True] < 0.05 * ref.abs().max().item()
    assert errs[True] < 2 * errs[False] + 1e-3  # no worse than the fused kernel in bf16, beyond rounding


def test_bias_cache_follows_the_parameter():
    a = _attn()
    x = torch.randn(2, 49, 64)
    with torch.inference_mode():
        before = a(x)
        assert torch.allclose(before, _reference(a, x), atol=1e-5)
    with torch.no_grad():
        a.attention_biases.mul_(-1.0)  # an in-place update (an optimiser step, load_state_dict)
    with torch.inference_mode():
        after = a(x)
        assert torch.allclose(after, _reference(a, x), atol=1e-5)
        assert not torch.allclose(before, after, atol=1e-3)


def test_training_path_gets_gradients_to_the_biases():
    a = _attn()
    a(torch.randn(2, 49, 64)).sum().backward()
    assert a.attention_biases.grad is not None and a.attention_biases.grad.abs().sum() > 0


def test_conv_gelu_is_one_fused_call_under_bf16_autocast(monkeypatch):
    op = tiny_vit._fused_conv_gelu()
    if not op:
        import pytest
        pytest.skip("no oneDNN conv + GELU op in this torch build")
    calls = []
    monkeypatch.setattr(tiny_vit, "_conv_pointwise_op", lambda *a: calls.append(a[1].dtype) or op(*a))
    torch.manual_seed(0)
    conv, act = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.GELU()
    x = torch.randn(1, 12, 10, 16)  # channels-last tokens
    with torch.inference_mode():
        ref = act(F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=1, groups=16)).permute(0, 2, 3, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = tiny_vit.conv_act(conv, act, x.to(torch.bfloat16))
    assert calls == [torch.bfloat16]  # one fused call, on the bf16 weight copy
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert (y.float() - ref).abs().max() < 0.03 * ref.abs().max() + 0.02


def test_folded_bias_pieces_compute_the_biased_attention():
    # fp32 in: the pieces (2 windows each, the last one short) give softmax(q k^T s + bias) v
    torch.manual_seed(1)
    q, k, v = (torch.randn(5, 3, 49, 16) for _ in range(3))
    bias = torch.randn(3, 49, 49)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.25 + bias, -1) @ v
    out = tiny_vit._folded_bias_attention(q, k, v, bias, 0.25, 2)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5


def test_bf16_folded_and_bf16_softmax_options_stay_near_fp32(monkeypatch):
    a = _attn()
    x = torch.randn(6, 49, 64)
    with torch.inference_mode():
        ref = _reference(a, x)
        fp32 = a(x)
        errs = {}
        for scores, tokens in ((0, 0), (10_000, 0), (10_000, 49), (0, 49)):
            monkeypatch.setattr(tiny_vit, "FOLDED_BIAS_SCORES", scores)
            monkeypatch.setattr(tiny_vit, "BF16_SOFTMAX_TOKENS", tokens)
            assert torch.equal(a(x), fp32)  # fp32 never takes these paths
            with torch.autocast("cpu", dtype=torch.bfloat16):
                errs[scores, tokens] = (a(x).float() - ref).abs().max().item()
    for e in errs.values():
        assert e < 2 * errs[0, 0] + 1e-3
