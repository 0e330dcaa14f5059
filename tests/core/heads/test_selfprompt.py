"""The selfprompt head: ESP-MedSAM's patch prompts and class queries, and the head contract."""

from __future__ import annotations

import pytest
import torch

from napari_medsam.core.errors import MedSamError
from napari_medsam.core.heads import HEAD_DESCRIPTIONS, HEADS, build_head
from napari_medsam.core.heads.selfprompt import SelfPromptHead, patch_targets, upsample_patches

from ._contract import (
    K,
    check_gradients,
    check_round_trip_and_refusal,
    check_training_lowers_the_loss,
    check_windows_are_placed,
    save_as_old_head_file,
)


def test_registered():
    assert "selfprompt" in HEADS and "ESP-MedSAM" in HEAD_DESCRIPTIONS["selfprompt"]


def test_outputs_and_rebuild(loaded):
    head = build_head("selfprompt", num_classes=K, loaded=loaded)
    c, h, w = loaded.spec.embedding_shape
    side = loaded.spec.low_res_size
    masks, patch = head.training_forward(torch.randn(2, c, h, w))
    assert masks.shape == (2, K, side, side)
    assert patch.shape == (2, K - 1, h // 2, w // 2)  # one coarse map per foreground class
    assert head(torch.randn(3, c, h, w)).shape == (3, K, side, side)
    again = build_head("selfprompt", num_classes=K, loaded=loaded.spec, **head.config)
    assert again.state_dict().keys() == head.state_dict().keys()


def test_every_parameter_gets_a_gradient_and_no_encoder_parameter(loaded):
    check_gradients(loaded, "selfprompt", {})


def test_patch_targets_are_max_pooled_labels():
    target = torch.zeros(1, 3, 16, 16)
    target[0, 0] = 1.0
    target[0, 1, 2, 3] = 1.0  # one pixel of class 1 in patch (0, 0)
    target[0, 0, 2, 3] = 0.0
    target[0, 2, 8:16, 8:16] = 1.0  # class 2 fills patch (1, 1)
    target[0, 0, 8:16, 8:16] = 0.0
    t = patch_targets(target, (2, 2))
    assert t.shape == (1, 2, 2, 2)
    assert t[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert t[0, 1].tolist() == [[0.0, 0.0], [0.0, 1.0]]


def test_the_patch_map_prompts_the_decoder(loaded):
    # the dense prompt depends on the patch map: a different patch map gives different masks
    head = build_head("selfprompt", num_classes=K, loaded=loaded)
    emb = torch.randn(1, *loaded.spec.embedding_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = head(emb)
        head.patch_net[-1].bias.add_(5.0)  # every patch "holds" every class
        assert not torch.allclose(head(emb), before)


def test_classes_share_one_hypernetwork_and_one_pass(loaded):
    head = build_head("selfprompt", num_classes=K, loaded=loaded)
    assert not hasattr(head, "hypernetworks")
    calls = []
    hook = head.transformer.register_forward_hook(lambda *a: calls.append(1))
    head(torch.randn(2, *loaded.spec.embedding_shape))
    hook.remove()
    assert len(calls) == 1
    # the queries start from the backbone's mask tokens, distinct per class
    n_src = loaded.model.mask_decoder.mask_tokens.weight.shape[0]
    for k in range(K):
        assert torch.equal(head.queries[k], loaded.model.mask_decoder.mask_tokens.weight[k % n_src])


def test_patch_loss_counts(loaded):
    head = build_head("selfprompt", num_classes=K, loaded=loaded, patch_weight=0.0)
    weighted = build_head("selfprompt", num_classes=K, loaded=loaded, patch_weight=2.0)
    weighted.load_state_dict(head.state_dict())
    emb = torch.randn(1, *loaded.spec.embedding_shape)
    side = loaded.spec.low_res_size
    target = torch.zeros(1, K, side, side)
    target[:, 0] = 1.0
    with torch.no_grad():
        out = head.training_forward(emb)
        assert float(weighted.loss(out, target, 0.0)) > float(head.loss(out, target, 0.0))
    with pytest.raises(MedSamError, match="invalid options"):
        build_head("selfprompt", num_classes=K, loaded=loaded.spec, nope=1)


def test_training_lowers_the_loss_and_the_head_file_round_trips(tmp_path, loaded, other, encoder_and_data):
    encoder, data = encoder_and_data
    head = check_training_lowers_the_loss(loaded, data, "selfprompt", {})
    assert head.meta.kind == "selfprompt"
    check_round_trip_and_refusal(tmp_path, loaded, other, encoder, head)


def test_trained_on_placed_windows(monkeypatch, loaded, encoder_and_data):
    check_windows_are_placed(monkeypatch, loaded, encoder_and_data[1], SelfPromptHead)


def test_one_wrong_patch_blends_into_its_neighbours_instead_of_a_square_step(loaded):
    # nearest upsampling (the old default) copied a patch's probability onto its 2x2 cells and
    # nowhere else: a patch the map got wrong became a square 8 px hole in the masks
    head = build_head("selfprompt", num_classes=K, loaded=loaded)
    assert head.config["prompt_upsample"] == "bilinear"
    seen = []
    hook = head.prompt_net.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    emb = torch.randn(1, *loaded.spec.embedding_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head(emb)
    hook.remove()
    c, h, w = loaded.spec.embedding_shape
    with torch.no_grad():
        patch = torch.sigmoid(head.patch_net(emb))  # (1, K-1, h/2, w/2)
    grid = seen[0]  # (1, K-1, h, w): what the prompt conv read
    assert grid.shape == (1, K - 1, h, w)
    one = torch.zeros_like(patch)
    one[..., 2, 2] = 1.0  # a single "wrong" patch, cells 4..5 x 4..5
    up = upsample_patches(one, (h, w))
    assert 0.0 < float(up[0, 0, 4, 4]) < 1.0  # blended with its neighbours, not a step
    assert float(up[0, 0, 3, 4]) > 0.0 and float(up[0, 0, 6, 5]) > 0.0  # and felt just outside its cells
    assert float(up[0, 0, 0, 0]) == 0.0  # but only there
    assert torch.allclose(grid, upsample_patches(patch, (h, w)))
    nearest = upsample_patches(one, (h, w), "nearest")
    assert float(nearest[0, 0, 3, 4]) == 0.0 and float(nearest[0, 0, 4, 4]) == 1.0
    with pytest.raises(ValueError, match="prompt_upsample"):
        build_head("selfprompt", num_classes=K, loaded=loaded, prompt_upsample="cubic")


def test_a_head_file_written_before_prompt_upsample_loads_with_nearest(tmp_path, loaded):
    """Files from before the bilinear default recorded no ``prompt_upsample``: they were trained on
    nearest-upsampled patch maps and load with them, giving the masks they gave then."""
    from napari_medsam.core.finetune import load_head

    torch.manual_seed(0)
    module = build_head("selfprompt", num_classes=K, loaded=loaded, prompt_upsample="nearest")
    path = save_as_old_head_file(tmp_path / "old.head", module, loaded, drop="prompt_upsample")
    back = load_head(path, loaded=loaded)
    assert back.meta.config["prompt_upsample"] == "nearest"
    emb = torch.randn(1, *loaded.spec.embedding_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        module.eval()
        assert torch.equal(back.module(emb), module(emb))
        bilinear = build_head("selfprompt", num_classes=K, loaded=loaded.spec)
        bilinear.load_state_dict(module.state_dict())
        assert not torch.allclose(bilinear.eval()(emb), module(emb))
