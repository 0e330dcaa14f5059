"""The decoder's CPU inference fast paths give the reference modules' outputs (folded attention,
channels-last upscaling, cached positional encoding); ``fast=False`` selects the reference."""

from __future__ import annotations

import copy

import pytest
import torch

from napari_medsam.core.nets import sam


def _perturbed(tiny_lite):
    """A copy of the tiny model with every decoder parameter randomised (biases included: the
    folded attention treats query/key biases specially, so zero biases would hide a mistake)."""
    torch.manual_seed(1)
    model = copy.deepcopy(tiny_lite.model)
    with torch.no_grad():
        for p in model.mask_decoder.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("n_tokens", [1, 2, 7, 16])
def test_folded_transformer_matches_reference(tiny_lite, n_tokens):
    model = _perturbed(tiny_lite)
    t = model.mask_decoder.transformer
    c, h, w = tiny_lite.spec.embedding_shape
    x = torch.randn(2, c, h, w)
    pe = model.prompt_encoder.get_dense_pe()
    tok = torch.randn(2, n_tokens, c)
    with torch.no_grad():
        assert sam.use_folded(t, tok)
        q_fast, k_fast = t(x, pe, tok)
        q_sub, _ = t(x, pe, tok, outputs=[0, n_tokens - 1])
        assert not sam.use_folded(t, tok, fast=False)
        q_ref, k_ref = t(x, pe, tok, fast=False)
    torch.testing.assert_close(q_fast, q_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k_fast, k_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q_sub, q_ref[:, [0, n_tokens - 1]], atol=1e-4, rtol=1e-4)


def test_fold_is_not_used_with_autograd_or_many_tokens(tiny_lite):
    t = tiny_lite.model.mask_decoder.transformer
    assert not sam.use_folded(t, torch.zeros(1, sam.FOLD_MAX_TOKENS + 1, 8))
    with torch.enable_grad():
        assert not sam.use_folded(t, torch.zeros(1, 3, 8))


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fast_decoder_masks_match_reference(tiny_lite, multimask, with_mask):
    model = _perturbed(tiny_lite)
    pe_mod, dec = model.prompt_encoder, model.mask_decoder
    c, h, w = tiny_lite.spec.embedding_shape
    emb = torch.randn(1, c, h, w)
    pts = (torch.tensor([[[10.0, 20.0], [30.0, 5.0]], [[40.0, 41.0], [2.0, 60.0]]]), torch.tensor([[1, 0], [1, 1]]))
    boxes = torch.tensor([[5.0, 6.0, 50.0, 40.0], [1.0, 2.0, 30.0, 60.0]])
    masks = torch.randn(2, 1, 4 * h, 4 * w) if with_mask else None
    with torch.no_grad():
        sparse, dense = pe_mod(pts, boxes, masks)
        fast = dec(emb, pe_mod.get_dense_pe(), sparse, dense, multimask_output=multimask)
        ref = dec(emb, pe_mod.get_dense_pe(), sparse, dense, multimask_output=multimask, fast=False)
    assert fast[0].shape == ref[0].shape == (2, 3 if multimask else 1, 4 * h, 4 * w)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast[1], ref[1], atol=1e-4, rtol=1e-4)


def test_dense_pe_cache_follows_the_weights(tiny_lite):
    pe_mod = copy.deepcopy(tiny_lite.model.prompt_encoder)
    with torch.no_grad():
        a = pe_mod.get_dense_pe()
        assert pe_mod.get_dense_pe() is a  # cached
        m = pe_mod.pe_layer.positional_encoding_gaussian_matrix
        m.mul_(2.0)  # new weights (load_state_dict copies in place too)
        b = pe_mod.get_dense_pe()
    assert b is not a
    torch.testing.assert_close(b, pe_mod.pe_layer(pe_mod.image_embedding_size).unsqueeze(0).detach())
    b_grad = pe_mod.get_dense_pe()  # with autograd: a fresh tensor, never the cached inference one
    assert b_grad is not b and b_grad.requires_grad == m.requires_grad


def test_real_litemedsam_fast_decoder_matches_reference(litemedsam):
    """On the real weights and a real-scale embedding grid (64 x 64 x 256, 8 heads)."""
    torch.manual_seed(0)
    pe_mod, dec = litemedsam.model.prompt_encoder, litemedsam.model.mask_decoder
    emb = torch.randn(1, 256, 64, 64)
    with torch.no_grad():
        sparse, dense = pe_mod(None, torch.tensor([[30.0, 40.0, 150.0, 200.0]]), None)
        fast = dec(emb, pe_mod.get_dense_pe(), sparse, dense, multimask_output=False)
        ref = dec(emb, pe_mod.get_dense_pe(), sparse, dense, multimask_output=False, fast=False)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-3, rtol=1e-3)
    assert ((fast[0] > 0) == (ref[0] > 0)).float().mean() > 0.999


def test_upscaling_blocks_do_not_change_the_masks(tiny_lite):
    dec = _perturbed(tiny_lite).mask_decoder
    c, h, w = tiny_lite.spec.embedding_shape
    src, hyper = torch.randn(2, h * w, c), torch.randn(2, 3, c // 8)
    with torch.no_grad():
        whole = dec._masks_channels_last(src, hyper, h, w, block=h * w)
        odd = dec._masks_channels_last(src, hyper, h, w, block=7)  # blocks that do not divide the grid
    torch.testing.assert_close(odd, whole, atol=1e-5, rtol=1e-5)


def test_decode_fast_false_runs_the_reference_modules(tiny_lite, monkeypatch):
    """``decode(..., fast=False)`` reaches the decoder as a parameter: the folded path is not taken."""

    from napari_medsam.core.preprocess import SliceTransform
    from napari_medsam.core.segment import Prompt2D, decode

    calls = []
    real = sam.TwoWayTransformer._forward_folded
    monkeypatch.setattr(sam.TwoWayTransformer, "_forward_folded",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    c, h, w = tiny_lite.spec.embedding_shape
    emb = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))
    tf = SliceTransform.for_model((40, 30), tiny_lite.spec)
    p = [Prompt2D.from_box((5, 4, 30, 20))]
    ref = decode(tiny_lite, emb, tf, p, fast=False)[0]
    assert not calls
    ours = decode(tiny_lite, emb, tf, p)[0]
    assert calls
    assert (ref.mask == ours.mask).mean() > 0.99  # the same masks up to round-off at the threshold
