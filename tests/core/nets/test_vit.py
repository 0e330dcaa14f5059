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
