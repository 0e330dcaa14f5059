"""The adapter modules on their own: zero initialisation, LoRA's q/v layout, SD-Trans per spatial token, HyP-Adpt."""

from __future__ import annotations

import pytest
import torch

from napari_medsam.core.nets.adapters import (
    Adapter,
    BlockAdapter,
    DepthBranch,
    HypAdapter,
    LoRAQV,
    current_depth,
    depth_context,
    enable_slice_stacks,
    qkv_layout,
)
from napari_medsam.core.nets.tiny_vit import TinyViTBlock, WindowAttention
from napari_medsam.core.nets.vit import Attention, Block


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_adapter_starts_as_identity_or_zero():
    x = torch.randn(2, 5, 16)
    assert torch.equal(Adapter(16, skip=True)(x), x)
    assert torch.equal(Adapter(16, skip=False)(x), torch.zeros_like(x))
    a = Adapter(16, 0.25, skip=False)
    assert a.down.out_features == 4 and a.up.in_features == 4


@pytest.mark.parametrize("attn", [Attention(24, 3, (4, 4)), WindowAttention(24, 3, 4)], ids=["vit", "tinyvit"])
def test_lora_updates_q_and_v_only(attn):
    """With B non-zero, the k part of the fused projection is untouched and q / v get B A x."""
    layout = qkv_layout(attn)
    lora = LoRAQV(24, 2, heads=3, layout=layout)
    x = torch.randn(7, 24)
    qkv = torch.randn(7, 72)
    assert torch.equal(lora(x, qkv), qkv)  # B starts at zero
    _randomise(lora)
    out = lora(x, qkv)

    def split(t):
        if layout == "head":  # per head: q, k, v of head 0, then of head 1 ...
            q, k, v = t.view(7, 3, 3, 8).unbind(2)
            return q.reshape(7, 24), k.reshape(7, 24), v.reshape(7, 24)
        return t.view(7, 3, 24).unbind(1)

    q0, k0, v0 = split(qkv)
    q1, k1, v1 = split(out)
    assert torch.equal(k1, k0)
    torch.testing.assert_close(q1 - q0, lora.b_q(lora.a_q(x)))
    torch.testing.assert_close(v1 - v0, lora.b_v(lora.a_v(x)))
    assert (q1 != q0).any() and (v1 != v0).any()


def test_lora_parameters_match_sameds_count():
    """ViT-B, rank 5, 12 blocks: 184,320 (the analytic figure of H-SAM / SAMed's LoRA)."""
    per_block = sum(p.numel() for p in LoRAQV(768, 5, heads=12, layout="qkv").parameters())
    assert 12 * per_block == 184_320


@pytest.mark.parametrize("kind", ["vit", "tinyvit"])
def test_block_with_zero_adapter_is_bit_identical(kind):
    torch.manual_seed(0)
    blk = Block(24, 3, 4.0, 4, (8, 8)) if kind == "vit" else TinyViTBlock(24, 3, 4, 4.0)
    blk.eval()
    x = torch.randn(3, 8, 8, 24)
    with torch.no_grad():
        ref = blk(x)
        blk.adapter = BlockAdapter(24, depth=True)
        blk.attn.lora = LoRAQV(24, 2, heads=3, layout=qkv_layout(blk.attn))
        assert torch.equal(blk(x), ref)
        with depth_context(3):
            assert torch.equal(blk(x), ref)
        _randomise(blk.adapter)
        assert not torch.equal(blk(x), ref)


@pytest.mark.parametrize("kind", ["vit", "tinyvit"])
def test_depth_branch_attends_per_spatial_token(kind):
    """Changing one token of one neighbour slice changes the depth branch's output at that token's
    position only (in every slice of the stack), never elsewhere in its window."""
    torch.manual_seed(0)
    attn = Attention(24, 3, (4, 4)) if kind == "vit" else WindowAttention(24, 3, 4)
    # the default init's small projections make the change ~1e-8, at float round-off, where one
    # slice's change can vanish (seen on an AVX2 CPU): projections of a real size instead
    _randomise(attn, seed=2)
    branch = DepthBranch(24)
    _randomise(branch.adapter)
    d, b, h, w = 3, 2, 8, 8
    x = torch.randn(b * d, h, w, 24)
    with torch.no_grad():
        ref = branch(attn, x, d)
        x2 = x.clone()
        x2[1 * d + 0, 2, 5] += 1.0  # stack 1, first slice, token (2, 5)
        out = branch(attn, x2, d)
    changed = (out - ref).abs().amax(-1) > 0  # (B*D, H, W)
    assert changed[d:2 * d, 2, 5].all()
    changed[d:2 * d, 2, 5] = False
    assert not changed.any()


def test_block_adapter_depth_only_with_stacks():
    ad = BlockAdapter(24, space=False, mlp=False, depth=True)
    _randomise(ad.depth)
    attn = WindowAttention(24, 3, 4)
    x = torch.randn(3, 4, 4, 24)
    y = torch.randn(3, 4, 4, 24)
    assert current_depth() == 1
    with torch.no_grad():
        assert torch.equal(ad.after_attention(attn, x, y), y)  # plain slices: no depth branch
        with depth_context(3):
            assert not torch.equal(ad.after_attention(attn, x, y), y)
    assert current_depth() == 1


def test_slice_stack_hooks_return_the_centre_slice():
    class Enc(torch.nn.Module):
        def forward(self, x):
            self.seen = x.shape
            return x.mean(1, keepdim=True) * (1 + current_depth())

    enc = Enc()
    handles = enable_slice_stacks(enc)
    x = torch.randn(2, 3, 3, 4, 4)  # (B, D, 3, S, S)
    out = enc(x)
    assert enc.seen == (6, 3, 4, 4)
    torch.testing.assert_close(out, x[:, 1].mean(1, keepdim=True) * 4)
    plain = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(enc(plain), plain.mean(1, keepdim=True) * 2)
    for hd in handles:
        hd.remove()


def test_hyp_adapter_is_conditioned_on_the_prompt():
    hyp = HypAdapter(16, rank=4, hidden=8)
    tokens = torch.randn(2, 5, 16)
    prompts = torch.randn(2, 2, 16)
    assert torch.equal(hyp(tokens, prompts), tokens)  # generated up-weights start at zero
    _randomise(hyp)
    out = hyp(tokens, prompts)
    assert not torch.equal(out, tokens)
    other = hyp(tokens, prompts.flip(0))  # swap the two objects' prompts
    assert not torch.allclose(other[0], out[0])
    assert torch.equal(hyp(tokens, prompts[:, :0]), tokens)  # no sparse prompt: unchanged


def test_hyp_adapter_weights_get_gradients():
    hyp = HypAdapter(16, rank=4, hidden=8)
    tokens = torch.randn(2, 5, 16)
    hyp(tokens, torch.randn(2, 2, 16)).sum().backward()
    assert hyp.gen_up.weight.grad is not None and hyp.gen_up.weight.grad.abs().sum() > 0
