"""The inference speed-ups keep the encoder's outputs (or, for int8, change its cache identity)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_medsam.core import speed
from napari_medsam.core.build import load_model
from napari_medsam.core.encoder import VolumeEncoder, run_encoder
from napari_medsam.core.nets.common import LayerNorm2d
from napari_medsam.core.nets.tiny_vit import Conv2dBN, MBConv, PatchMerging, WindowAttention, pointwise
from napari_medsam.core.progress import drain


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("conv", "cin"), [
    (torch.nn.Conv2d(6, 10, 1), 6),                        # 1x1: a matmul over tokens
    (torch.nn.Conv2d(10, 10, 3, 1, 1, groups=10), 10),     # depthwise
    (torch.nn.Conv2d(10, 10, 3, 2, 1, groups=10), 10),     # strided depthwise
    (torch.nn.Conv2d(3, 8, 3, 2, 1), 3),                   # MobileSAM's patch embedding
])
def test_pointwise_on_channels_last_tokens_equals_nchw_conv(conv, cin):
    torch.manual_seed(0)
    x = torch.randn(2, cin, 13, 11)
    with torch.inference_mode():
        ref = conv(x)
        out = pointwise(conv, x.permute(0, 2, 3, 1).contiguous())
    assert out.is_contiguous()
    _close(out.permute(0, 3, 1, 2), ref)


def test_pointwise_runs_unfused_conv_bn_and_linear():
    torch.manual_seed(0)
    cbn = Conv2dBN(4, 6).eval()
    cbn.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(1, 4, 5, 7)
    with torch.inference_mode():
        _close(pointwise(cbn, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), cbn(x))
        lin = torch.nn.Linear(4, 6)
        _close(pointwise(lin, x.permute(0, 2, 3, 1)), lin(x.permute(0, 2, 3, 1)))


def test_layernorm2d_channels_last_equals_nchw():
    torch.manual_seed(0)
    ln = LayerNorm2d(8)
    ln.weight.data.uniform_(0.5, 2)
    ln.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 8, 5, 6)
    _close(ln.forward_channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), ln(x))


def test_window_attention_4d_mask_equals_explicit_softmax():
    torch.manual_seed(0)
    att = WindowAttention(8, 2, 3)
    att.attention_biases.data.normal_()
    x = torch.randn(5, 9, 8)
    with torch.inference_mode():
        out = att(x)
        q, k, v = att.qkv(att.norm(x)).view(5, 9, 2, 12).permute(0, 2, 1, 3).split(4, dim=3)
        bias = att.attention_biases[:, att.attention_bias_idxs]
        a = (q @ k.transpose(-1, -2)) * 4 ** -0.5 + bias
        ref = att.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(5, 9, 8))
    _close(out, ref)


@pytest.mark.parametrize("band", [1, 3, 5, 16])
@pytest.mark.parametrize("batch", [1, 2])
def test_banded_mbconv_equals_whole(band, batch):
    torch.manual_seed(0)
    blk = MBConv(4, 2.0).eval()
    x = torch.randn(batch, 17, 9, 4)
    with torch.inference_mode():
        ref = blk(x)
        blk.band_rows = band
        _close(blk(x), ref)


@pytest.mark.parametrize("h", [16, 17])
@pytest.mark.parametrize("band", [1, 2, 3, 7])
def test_banded_patch_merging_equals_whole(h, band):
    torch.manual_seed(0)
    pm = PatchMerging(4, 6, 2).eval()
    from napari_medsam.core.nets.tiny_vit import fuse_conv_bn

    fuse_conv_bn(pm)
    x = torch.randn(2, h, 10, 4)
    with torch.inference_mode():
        ref = pm(x)
        pm.band_rows = band
        out = pm(x)
    assert out.shape == ref.shape
    _close(out, ref)


@pytest.mark.parametrize("band", [0, 3])
def test_fused_conv_gelu_equals_two_ops(monkeypatch, band):
    from napari_medsam.core.nets import tiny_vit

    op = tiny_vit._fused_conv_gelu()
    if not op:
        pytest.skip("this PyTorch has no oneDNN conv with a fused activation")
    calls = []
    monkeypatch.setattr(tiny_vit, "_conv_pointwise_op", lambda *a: calls.append(1) or op(*a))
    torch.manual_seed(0)
    blocks = [tiny_vit.fuse_conv_bn(MBConv(4, 2.0)).eval(), tiny_vit.fuse_conv_bn(PatchMerging(4, 6, 2)).eval()]
    for m in blocks:
        for bn in m.modules():  # give the folded biases something to do
            if isinstance(bn, torch.nn.Conv2d):
                torch.nn.init.normal_(bn.bias)
        m.band_rows = band
    x = torch.randn(2, 13, 9, 4)
    for m in blocks:
        with torch.inference_mode():
            monkeypatch.setattr(tiny_vit, "FUSE_CONV_GELU", False)
            ref = m(x)
            monkeypatch.setattr(tiny_vit, "FUSE_CONV_GELU", True)
            n = len(calls)
            out = m(x)
        assert len(calls) > n  # the fused op ran
        _close(out, ref)
        n = len(calls)
        with torch.enable_grad():
            _close(m(x.requires_grad_()), ref)  # autograd: the two-op path (the fused op has no gradient)
        x = x.detach()
        assert len(calls) == n


@pytest.mark.parametrize("name", ["test_tiny_lite", "test_tiny_vit"])
def test_optimized_model_equals_plain_model(name):
    plain = load_model(name, device="cpu", precision="fp32", optimize=False)
    fast = load_model(name, device="cpu", precision="fp32")
    assert fast.compute_id == plain.compute_id  # exact speed-ups share cache entries
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    _close(run_encoder(fast, x), run_encoder(plain, x))
    # and the unfused network computes the same
    unfused = load_model(name, device="cpu", precision="fp32", fuse=False, optimize=False)
    _close(run_encoder(unfused, x), run_encoder(plain, x))


def test_band_rows_are_set_for_the_conv_stage_only(tiny_lite):
    enc = copy.deepcopy(tiny_lite.model.image_encoder)
    assert speed.set_band_rows(enc, 4) == 2  # the conv stage's one MBConv and its PatchMerging
    assert enc.layers[0].blocks[0].band_rows == 4
    assert all(getattr(m, "band_rows", 0) == 0 for layer in enc.layers[1:] for m in layer.modules())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_int8_changes_the_cache_identity_not_the_shape(precision):
    # bf16: what auto precision picks on a CPU with native bf16; int8 must run there too (fp32 activations)
    tiny_lite = load_model("test_tiny_lite", device="cpu", precision=precision)
    q = speed.optimize_for_inference(tiny_lite, int8=True)
    assert q is not tiny_lite and q.model is not tiny_lite.model
    assert q.dtype is None and q.compute_id == f"{tiny_lite.weights_hash}|fp32{speed.INT8_VARIANT}"
    assert q.model.mask_decoder is tiny_lite.model.mask_decoder  # the decoder is shared, not copied
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    a, b = run_encoder(tiny_lite, x), run_encoder(q, x)
    assert a.shape == b.shape and torch.isfinite(b).all()
    # the fp32 model is untouched
    assert not any("quantized" in type(m).__module__ for m in tiny_lite.model.modules())
    # quantizing twice is a no-op
    assert speed.optimize_for_inference(q, int8=True) is q


def test_int8_embeddings_get_their_own_cache_keys(tiny_lite):
    vol = np.random.default_rng(0).integers(0, 255, (3, 20, 20)).astype(np.uint8)
    q = speed.optimize_for_inference(tiny_lite, int8=True)
    a, b = VolumeEncoder(tiny_lite, vol), VolumeEncoder(q, vol)
    assert a.key(0) != b.key(0)
    drain(a.embed())
    assert not b.is_cached(0)


def test_load_model_int8_keyword():
    q = load_model("test_tiny_lite", device="cpu", int8=True)
    assert q.variant == speed.INT8_VARIANT


def test_in_place_activations_keep_autograd_working():
    loaded = load_model("test_tiny_lite", device="cpu", precision="fp32")
    enc = loaded.model.image_encoder
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    enc(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_sdpa_fallback_path_is_not_taken_by_window_attention():
    """A 3D mask would select the slow math kernel; ours must stay 4D."""
    att = WindowAttention(8, 2, 3)
    x = torch.randn(2, 9, 8)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask.dim())
        return real(q, k, v, attn_mask=attn_mask, **kw)

    F.scaled_dot_product_attention = spy
    try:
        with torch.inference_mode():
            att(x)
    finally:
        F.scaled_dot_product_attention = real
    assert seen == [4]


def test_encoder_call_size_is_one_slice_on_cpu_and_the_batch_elsewhere(tiny_lite):
    import dataclasses

    assert speed.encoder_call_size(tiny_lite, 4) == 1
    fake_gpu = dataclasses.replace(tiny_lite, device=torch.device("cuda"))
    assert speed.encoder_call_size(fake_gpu, 4) == 4


def test_conv_act_falls_back_when_the_fused_op_fails(monkeypatch):
    from napari_medsam.core.nets import tiny_vit

    def broken(*a):
        raise RuntimeError("no such fusion in this oneDNN build")

    monkeypatch.setattr(tiny_vit, "_conv_pointwise_op", broken)
    conv = torch.nn.Conv2d(4, 4, 3, 1, 1, groups=4)
    x = torch.randn(1, 5, 6, 4)
    with torch.inference_mode():
        out = tiny_vit.conv_act(conv, torch.nn.GELU(), x)
        ref = F.gelu(pointwise(conv, x))
    _close(out, ref)
    assert tiny_vit._conv_pointwise_op is False  # not tried again
