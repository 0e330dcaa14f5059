"""The hsam head: H-SAM's two stages, its three switchable parts, and the head contract."""

from __future__ import annotations

import pytest
import torch

from napari_medsam.core.heads import HEAD_DESCRIPTIONS, HEADS, build_head
from napari_medsam.core.heads.base import pe_windows
from napari_medsam.core.heads.hsam import HSamHead, stage_weight

from ._contract import (
    K,
    check_gradients,
    check_round_trip_and_refusal,
    check_training_lowers_the_loss,
    check_windows_are_placed,
    save_as_old_head_file,
)

PARTS = ("mask_attention", "masa", "hierarchical")
#: every part on and SAM's two layers in stage 2 (the default is mask attention only, one layer)
FULL = {"mask_attention": True, "masa": True, "hierarchical": True, "stage2_layers": 2}
CONFIGS = [{}, FULL, *({**FULL, p: False} for p in PARTS)]
IDS = ["default", "full", *(f"no-{p}" for p in PARTS)]


def test_registered():
    assert "hsam" in HEADS and "H-SAM" in HEAD_DESCRIPTIONS["hsam"]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_output_shape_and_rebuild(loaded, config):
    head = build_head("hsam", num_classes=K, loaded=loaded, **config)
    out = head(torch.randn(3, *loaded.spec.embedding_shape))
    side = loaded.spec.low_res_size
    assert out.shape == (3, K, side, side)
    m1, m2 = head.stages(torch.randn(2, *loaded.spec.embedding_shape))
    assert m1.shape == m2.shape == (2, K, side, side)
    again = build_head("hsam", num_classes=K, loaded=loaded.spec, **head.config)
    assert again.state_dict().keys() == head.state_dict().keys()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_every_parameter_gets_a_gradient_and_no_encoder_parameter(loaded, config):
    check_gradients(loaded, "hsam", config)


def test_default_is_mask_attention_and_one_stage_two_layer(loaded):
    head = build_head("hsam", num_classes=K, loaded=loaded)
    assert head.config == {"mask_attention": True, "masa": False, "hierarchical": False, "masa_grid": 16,
                           "stage2_layers": 1}
    assert len(head.transformer2.layers) == 1 and len(head.transformer1.layers) == 2
    # the one layer is the backbone's first (skips the positional encoding in its self-attention)
    first = loaded.model.mask_decoder.transformer.layers[0]
    assert head.transformer2.layers[0].skip_first_layer_pe
    for (n1, p1), (n2, p2) in zip(head.transformer2.layers[0].state_dict().items(), first.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert not any(k.startswith(("masa_", "fuse.")) for k in head.state_dict())
    with pytest.raises(ValueError, match="stage2_layers"):
        build_head("hsam", num_classes=K, loaded=loaded, stage2_layers=3)


def test_each_part_can_be_switched_off(loaded):
    full = build_head("hsam", num_classes=K, loaded=loaded, **FULL)
    n_full = full.n_parameters()
    keys = set(full.state_dict())
    owned = {"mask_attention": "gain_", "masa": "masa_", "hierarchical": "fuse."}
    for part, prefix in owned.items():
        head = build_head("hsam", num_classes=K, loaded=loaded, **{**FULL, part: False})
        assert head.n_parameters() < n_full, part
        assert keys - set(head.state_dict()) == {k for k in keys if k.startswith(prefix)}, part
        # and the part changes what the head computes
        emb = torch.randn(1, *loaded.spec.embedding_shape, generator=torch.Generator().manual_seed(0))
        head.load_state_dict({k: v for k, v in full.state_dict().items() if k in head.state_dict()})
        with torch.no_grad():
            assert not torch.allclose(head(emb), full(emb)), part


def test_stage_one_is_the_backbone_decoder_without_prompts(loaded):
    # stage 1 starts as the autosam head does (same weights from the backbone, SAM's block order)
    head = build_head("hsam", num_classes=K, loaded=loaded)
    auto = build_head("autosam", num_classes=K, loaded=loaded)
    dec = loaded.model.mask_decoder
    for (n1, p1), (n2, p2) in zip(head.transformer1.state_dict().items(), dec.transformer.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(head.dense_pe(), loaded.model.prompt_encoder.get_dense_pe())
    emb = torch.randn(2, *loaded.spec.embedding_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m1, _ = head.stages(emb)
        torch.testing.assert_close(m1, auto(emb))
    assert head.tokens1.data_ptr() != dec.mask_tokens.weight.data_ptr()  # its own weights


def test_mask_attention_follows_the_prior(loaded):
    # with the gains at 0 the prior has no effect; at 1 it changes stage 2
    head = build_head("hsam", num_classes=K, loaded=loaded, masa=False)
    emb = torch.randn(1, *loaded.spec.embedding_shape, generator=torch.Generator().manual_seed(0))
    plain = build_head("hsam", num_classes=K, loaded=loaded, masa=False, mask_attention=False)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if k in plain.state_dict()})
    with torch.no_grad():
        on = head.stages(emb)[1]
        head.gain_t2i.zero_()
        head.gain_i2t.zero_()
        torch.testing.assert_close(head.stages(emb)[1], plain.stages(emb)[1])
        assert not torch.allclose(on, plain.stages(emb)[1])


def test_reweighting_is_not_the_identity(loaded):
    # the original's softmax over one channel gives a gate of 1 everywhere; ours varies over the grid
    head = build_head("hsam", num_classes=K, loaded=loaded, masa=True)
    emb = torch.randn(1, *loaded.spec.embedding_shape, generator=torch.Generator().manual_seed(0))
    gates = []
    hook = head.masa_attn.register_forward_hook(lambda m, a, out: gates.append(out))
    with torch.no_grad():
        head(emb)
    hook.remove()
    assert len(gates) == 1 and gates[0].shape == (1, K, head.masa_grid ** 2)
    src = emb + head.no_mask_embed.view(1, -1, 1, 1)
    m1, _, hs, keys = head._stage1(src, head.dense_pe())
    lp = torch.log_softmax(torch.nn.functional.avg_pool2d(m1, 4), dim=1)
    with torch.no_grad():
        out = head._masa(src, hs, keys, lp)
    ratio = (out - src) / src  # = gamma * gate
    assert ratio.std() > 1e-3 and float(ratio.min()) > 0 and float(ratio.max()) < 1


def test_stage_weight_moves_to_stage_two():
    w = [stage_weight(p) for p in (0.0, 0.25, 0.5, 1.0)]
    assert w[0] == pytest.approx(0.6) and w[-1] == pytest.approx(0.975, abs=1e-3)
    assert w == sorted(w)


def test_positional_windows(loaded):
    head = build_head("hsam", num_classes=K, loaded=loaded)
    pe = head.dense_pe()
    win = pe_windows(pe, (5, 6), torch.tensor([[0, 0], [3, 7]]))
    assert torch.equal(win[0], pe[0, :, :5, :6]) and torch.equal(win[1], pe[0, :, 3:8, 7:13])
    assert torch.equal(pe_windows(pe, (5, 6), None), pe[..., :5, :6])


def test_training_lowers_the_loss_and_the_head_file_round_trips(tmp_path, loaded, other, encoder_and_data):
    encoder, data = encoder_and_data
    head = check_training_lowers_the_loss(loaded, data, "hsam", FULL)
    assert head.meta.kind == "hsam" and head.meta.config["masa"] is True and head.meta.config["stage2_layers"] == 2
    check_round_trip_and_refusal(tmp_path, loaded, other, encoder, head)


def test_trained_on_placed_windows(monkeypatch, loaded, encoder_and_data):
    check_windows_are_placed(monkeypatch, loaded, encoder_and_data[1], HSamHead)



def test_a_head_file_written_before_stage2_layers_loads_with_both_layers(tmp_path, loaded):
    """Files from before the one-layer default recorded no ``stage2_layers`` and hold both two-way
    layers' weights: they load (and warm-start) with both, not with today's default of one."""
    import dataclasses as dc

    from napari_medsam.core.finetune import TrainedHead, load_head, save_head

    torch.manual_seed(0)
    module = build_head("hsam", num_classes=K + 1, loaded=loaded, stage2_layers=None)
    assert len(module.transformer2.layers) == 2
    path = save_as_old_head_file(tmp_path / "old.head", module, loaded, drop="stage2_layers")
    back = load_head(path, loaded=loaded)
    assert len(back.module.transformer2.layers) == 2 and back.meta.config["stage2_layers"] is None
    emb = torch.randn(1, *loaded.spec.embedding_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back.module(emb), module.eval()(emb))
    again = load_head(save_head(tmp_path / "again.head", TrainedHead(module=back.module, meta=dc.replace(back.meta))))
    assert len(again.module.transformer2.layers) == 2
