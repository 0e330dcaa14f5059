"""The head registry and the heads: shapes, gradients, initialisation from the backbone."""

from __future__ import annotations

import pytest
import torch

from napari_medsam.core.errors import MedSamError, UnknownModelError
from napari_medsam.core.finetune import segmentation_loss
from napari_medsam.core.heads import HEADS, build_head
from tests.core.heads._contract import assert_head_gradients

K = 4  # background + 3 classes: an odd head width
CONFIGS = [("linear", {}), ("cnn", {"width": 16}), ("cnn", {"image_skip": True, "width": 24, "skip_width": 8}),
           ("autosam", {})]
IDS = ["linear", "cnn", "cnn+img", "autosam"]


def _inputs(loaded, batch: int = 3):
    spec = loaded.spec
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, spec.input_size, spec.input_size, generator=gen)
    return image


@pytest.mark.parametrize(("kind", "config"), CONFIGS, ids=IDS)
def test_output_shape_and_config(loaded, kind, config):
    head = build_head(kind, num_classes=K, loaded=loaded, **config)
    emb = torch.randn(3, *loaded.spec.embedding_shape)
    out = head(emb, _inputs(loaded))
    side = loaded.spec.low_res_size
    assert out.shape == (3, K, side, side)
    assert head.kind == kind and head.num_classes == K
    # the config rebuilds the same architecture from the spec alone
    again = build_head(kind, num_classes=K, loaded=loaded.spec, **head.config)
    assert again.state_dict().keys() == head.state_dict().keys()


@pytest.mark.parametrize(("kind", "config"), CONFIGS, ids=IDS)
def test_every_head_parameter_gets_a_gradient_and_no_encoder_parameter(loaded, kind, config):
    head = build_head(kind, num_classes=K, loaded=loaded, **config)
    image = _inputs(loaded, 1)
    emb = loaded.model.image_encoder(image)  # through the frozen encoder, autograd on
    side = loaded.spec.low_res_size
    target = torch.softmax(torch.randn(1, K, side, side), dim=1)
    segmentation_loss(head(emb, image), target).backward()
    assert_head_gradients(head, loaded, kind)


def test_autosam_starts_from_the_backbone_decoder(loaded):
    head = build_head("autosam", num_classes=K, loaded=loaded)
    dec, pe = loaded.model.mask_decoder, loaded.model.prompt_encoder
    assert torch.equal(head.dense_pe(), pe.get_dense_pe())
    for (n1, p1), (n2, p2) in zip(head.transformer.state_dict().items(), dec.transformer.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    n_src = dec.mask_tokens.weight.shape[0]
    for k in range(K):
        assert torch.equal(head.class_tokens[k], dec.mask_tokens.weight[k % n_src])
    assert torch.equal(head.no_mask_embed, pe.no_mask_embed.weight[0])
    # the head's weights are its own: training it leaves the backbone untouched
    assert head.class_tokens.data_ptr() != dec.mask_tokens.weight.data_ptr()


def test_autosam_classes_come_out_of_one_pass(loaded):
    head = build_head("autosam", num_classes=K, loaded=loaded)
    calls = []
    hook = head.transformer.register_forward_hook(lambda *a: calls.append(1))
    head(torch.randn(2, *loaded.spec.embedding_shape))
    hook.remove()
    assert len(calls) == 1


def test_registry_errors(loaded):
    assert set(HEADS) >= {"linear", "cnn", "autosam"}
    with pytest.raises(UnknownModelError, match="linear"):
        build_head("nope", num_classes=3, loaded=loaded)
    with pytest.raises(MedSamError, match="at least one class"):
        build_head("linear", num_classes=1, loaded=loaded)
    with pytest.raises(MedSamError, match="invalid options"):
        build_head("linear", num_classes=3, loaded=loaded, depth=3)


def test_cnn_with_image_skip_needs_the_image(loaded):
    head = build_head("cnn", num_classes=3, loaded=loaded, image_skip=True)
    assert head.uses_image
    with pytest.raises(ValueError, match="image"):
        head(torch.randn(1, *loaded.spec.embedding_shape))
