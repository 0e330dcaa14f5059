"""Adapters in a loaded model: zero-step identity, cache identity, training from labels, files."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_medsam.core.adapt import (
    AdapterConfig,
    AdaptParams,
    adapted_encoder,
    adapter_config,
    base_model,
    describe_adapter,
    estimate_seconds,
    inject_adapters,
    load_adapter,
    parameter_counts,
    read_adapter_meta,
    save_adapter,
    train_adapters,
)
from napari_medsam.core.build import build_sam, load_model
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import Cancelled, CheckpointError, HeadMismatchError, MedSamError
from napari_medsam.core.loaded import LoadedModel
from napari_medsam.core.progress import drain
from napari_medsam.core.registry import get_spec
from napari_medsam.core.segment import Prompt2D, box_of, segment_slice
from tests._helpers import drain_steps

MODELS = ("test_tiny_lite", "test_tiny_vit")
PLAIN_CONFIGS = {"medsa": AdapterConfig(), "lora": AdapterConfig(kind="lora", rank=3),
                 "medsa+hyp": AdapterConfig(hyp=True), "lora+hyp": AdapterConfig(kind="lora", hyp=True)}


@pytest.fixture(scope="module")
def mni_small(mni):
    """A 12-slice coronal block of the MNI152 T1 with its brain mask as label 1, white matter as 2."""
    sl = slice(100, 112)
    t1 = np.ascontiguousarray(mni["t1"][:, sl, :]).astype(np.float32)
    lab = np.zeros(t1.shape, np.uint8)
    brain = mni["brain"][:, sl, :]
    lab[brain] = 1
    lab[brain & (mni["wm"][:, sl, :] > mni["gm"][:, sl, :])] = 2
    return t1, lab


def _box_masks(encoder, z, lab):
    gt = np.take(lab, z, axis=encoder.axis) > 0
    return segment_slice(encoder, z, [Prompt2D.from_box(box_of(gt))])[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("cfg", list(PLAIN_CONFIGS), ids=list(PLAIN_CONFIGS))
def test_zero_step_adapter_is_bit_identical(name, precision, cfg, mni_small):
    t1, lab = mni_small
    base = load_model(name, device="cpu", precision=precision)
    adapted = inject_adapters(base, PLAIN_CONFIGS[cfg])
    e0, e1 = VolumeEncoder(base, t1, axis=1), VolumeEncoder(adapted, t1, axis=1)
    assert e0.key(5) != e1.key(5)  # cached apart even though equal
    assert torch.equal(e0.get(5), e1.get(5))
    r0, r1 = _box_masks(e0, 5, lab), _box_masks(e1, 5, lab)
    assert np.array_equal(r0.mask, r1.mask) and np.array_equal(r0.logits, r1.logits) and r0.iou == r1.iou


@pytest.mark.parametrize("name", MODELS)
def test_zero_step_sd_trans_equals_plain_up_to_batching(name, mni_small):
    """SD-Trans embeds a slice from a stack of 3 as one batch: equal to the plain encoder up to the
    round-off of batched kernels (the depth adapter adds exact zeros)."""
    t1, _ = mni_small
    base = load_model(name, device="cpu", precision="fp32")
    adapted = inject_adapters(base, AdapterConfig(sd_trans=True, context=1))
    e0, e1 = VolumeEncoder(base, t1, axis=1), VolumeEncoder(adapted, t1, axis=1)
    stack = e1.encoder_input(5)
    assert stack.shape == (3, 3, 64, 64)
    np.testing.assert_array_equal(stack[1], e0.model_input(5))
    np.testing.assert_array_equal(e1.encoder_input(0)[0], e0.model_input(0))  # repeated at the volume's end
    with torch.inference_mode():
        plain = base.model.image_encoder(torch.from_numpy(e0.model_input(5))[None])
        ours = adapted.model.image_encoder(torch.from_numpy(stack)[None])
    assert ours.shape == plain.shape
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)


def test_injection_shares_frozen_weights_and_leaves_the_model_alone(tiny_lite):
    before = {k: v.clone() for k, v in tiny_lite.model.state_dict().items()}
    adapted = inject_adapters(tiny_lite, AdapterConfig(sd_trans=True, hyp=True))
    enc_p = dict(tiny_lite.model.image_encoder.named_parameters())
    for n, p in adapted.model.image_encoder.named_parameters():
        if ".adapter." not in n:
            assert p is enc_p[n]  # shared, not copied
    assert adapted.model.mask_decoder is not tiny_lite.model.mask_decoder
    assert all(b.adapter is None for b in tiny_lite.model.image_encoder.modules() if hasattr(b, "adapter"))
    assert adapter_config(tiny_lite) is None and adapter_config(adapted).tag == "medsa+sd1+hyp"
    assert base_model(adapted) is tiny_lite and describe_adapter(tiny_lite) == ""
    assert "medsa+sd1+hyp" in describe_adapter(adapted)
    # re-adapting an adapted model starts from the base
    again = inject_adapters(adapted, AdapterConfig(kind="lora"))
    assert base_model(again) is tiny_lite
    for k, v in tiny_lite.model.state_dict().items():
        assert torch.equal(v, before[k])


def _meta_loaded(name: str) -> LoadedModel:
    spec = get_spec(name)
    with torch.device("meta"):
        model = build_sam(spec)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(spec=spec, model=model, device=torch.device("meta"), dtype=None, weights_path=None,
                       weights_hash="meta")


def test_trainable_share_per_backbone(capsys):
    """Trainable parameters of each backbone we ship (printed: the figures of docs/benchmarks.md).

    Med-SA's two adapters per block on ViT-B are 7.10 M, LoRA rank 5 on q, v 184,320 (the analytic
    figures of docs METHODS 3.1 and 1.1); the whole decoder trains too."""
    rows = {}
    for name in ("litemedsam", "sam_vit_b"):
        base = _meta_loaded(name)
        for cfg in (AdapterConfig(), AdapterConfig(kind="lora", rank=5), AdapterConfig(sd_trans=True),
                    AdapterConfig(hyp=True)):
            c = parameter_counts(inject_adapters(base, cfg))
            rows[(name, cfg.tag)] = c
            print(f"{name:10s} {cfg.tag:10s} adapters {c['adapter']:>10,} ({100 * c['adapter_share']:.2f} % of the "
                  f"encoder's {c['encoder']:,}); trainable with the decoder {c['trainable']:,} = "
                  f"{100 * c['share']:.1f} % of {c['total']:,}")
    assert rows[("sam_vit_b", "medsa")]["adapter"] == 12 * 2 * (768 * 192 + 192 + 192 * 768 + 768) == 7_100_928
    assert rows[("sam_vit_b", "lora5")]["adapter"] == 184_320
    assert rows[("litemedsam", "medsa")]["adapter"] == 395_808  # 10 attention blocks (0.40 M in METHODS 3.1)
    assert rows[("litemedsam", "medsa+sd1")]["adapter"] == 593_712  # 3 adapters per block (0.59 M)
    for c in rows.values():
        assert c["trainable"] == c["adapter"] + c["decoder"]
    out = capsys.readouterr().out
    assert "sam_vit_b" in out
    with capsys.disabled():
        print("\n" + out)


@pytest.fixture(scope="module")
def trained(mni_small):
    t1, lab = mni_small
    base = load_model("test_tiny_lite", device="cpu", precision="fp32")
    enc = VolumeEncoder(base, t1, axis=1)
    params = AdaptParams(steps=4, batch_size=2, lr=1e-2, decoder_lr=1e-3, threads=1, seed=3)
    progress, result = drain_steps(train_adapters(enc, lab, [2, 6, 9], config=AdapterConfig(hyp=True), params=params))
    return {"base": base, "enc": enc, "result": result, "progress": progress, "params": params, "lab": lab}


def test_training_changes_adapters_not_the_backbone(trained):
    base, res = trained["base"], trained["result"]
    msgs = [p.message for p in trained["progress"]]
    assert msgs.count("preparing") == 3 and msgs.count("training") == 4
    last = trained["progress"][-1]
    assert last.step == last.total == 4 and np.isfinite(last.info["loss"]) and "eta" in last.info
    model = res.loaded.model
    ups = [m.up.weight for n, m in model.named_modules() if n.endswith(".space")]
    assert ups and all(w.abs().sum() > 0 for w in ups)  # the zero-initialised up-projections moved
    assert model.mask_decoder.token_adapter.gen_up.weight.abs().sum() > 0
    plain = dict(base.model.image_encoder.named_parameters())
    for n, p in model.image_encoder.named_parameters():
        assert not p.requires_grad
        if n in plain:
            assert p is plain[n]
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    dec0 = dict(base.model.mask_decoder.named_parameters())
    assert any(not torch.equal(p, dec0[n]) for n, p in model.mask_decoder.named_parameters() if n in dec0)
    m = res.meta
    assert m.backbone == "test_tiny_lite" and m.training_slices == (2, 6, 9) and m.class_ids == (1, 2)
    assert m.history["steps"] == 4 and m.history["precision"] == "fp32"
    assert res.loaded.variant.endswith(m.digest[:16])


def test_adapted_embeddings_are_new_and_cached_apart(trained):
    enc = trained["enc"]
    ad_enc = adapted_encoder(enc, trained["result"].loaded)
    assert ad_enc.key(4) != enc.key(4) and ad_enc.cache is enc.cache
    assert not torch.allclose(ad_enc.get(4), enc.get(4))
    assert enc.is_cached(4) and ad_enc.is_cached(4)
    r = _box_masks(ad_enc, 4, trained["lab"])  # a slice it never saw
    assert r.mask.shape == (197, 189)


def test_training_is_seeded(trained, mni_small):
    t1, lab = mni_small
    enc = VolumeEncoder(trained["base"], t1, axis=1)
    again = drain(train_adapters(enc, lab, [2, 6, 9], config=AdapterConfig(hyp=True), params=trained["params"]))
    assert again.meta.digest == trained["result"].meta.digest


def test_training_cancels(tiny_lite, mni_small):
    t1, lab = mni_small
    stop = threading.Event()
    gen = train_adapters(VolumeEncoder(tiny_lite, t1, axis=1), lab, [3], params=AdaptParams(steps=50), cancel=stop)
    next(gen)
    stop.set()
    with pytest.raises(Cancelled):
        drain(gen)


def test_training_refuses_empty_labels(tiny_lite, mni_small):
    t1, lab = mni_small
    with pytest.raises(MedSamError, match="empty"):
        drain(train_adapters(VolumeEncoder(tiny_lite, t1, axis=1), np.zeros_like(lab)))


@pytest.mark.parametrize("cfg", [AdapterConfig(kind="lora", rank=2), AdapterConfig(sd_trans=True)],
                         ids=["lora", "sd-trans"])
def test_lora_and_sd_trans_train(cfg, mni_small):
    t1, lab = mni_small
    base = load_model("test_tiny_vit", device="cpu", precision="fp32")
    enc = VolumeEncoder(base, t1, axis=1)
    res = drain(train_adapters(enc, lab, [5], config=cfg, params=AdaptParams(steps=2, lr=1e-2, threads=1)))
    ad = adapted_encoder(enc, res.loaded)
    assert not torch.allclose(ad.get(7), enc.get(7))
    assert np.isfinite(res.meta.history["final_loss"])


def test_save_load_round_trip(trained, tmp_path):
    res, enc, lab = trained["result"], trained["enc"], trained["lab"]
    path = save_adapter(tmp_path / "wm.adapter.pt", res)
    meta = read_adapter_meta(path)
    assert meta.digest == res.meta.digest and meta.adapter.tag == "medsa+hyp"
    back = load_adapter(path, trained["base"])
    assert back.loaded.compute_id == res.loaded.compute_id
    e1, e2 = adapted_encoder(enc, res.loaded), adapted_encoder(enc, back.loaded)
    assert e1.key(8) == e2.key(8)
    r1, r2 = _box_masks(e1, 8, lab), _box_masks(e2, 8, lab)
    assert np.array_equal(r1.mask, r2.mask)
    # loading into an adapted model applies the file to its base
    assert load_adapter(path, res.loaded).loaded.compute_id == res.loaded.compute_id


def test_load_refuses_other_backbones_and_bad_files(trained, tmp_path):
    path = save_adapter(tmp_path / "a.pt", trained["result"])
    with pytest.raises(HeadMismatchError, match="test_tiny_lite"):
        load_adapter(path, load_model("test_tiny_vit", device="cpu"))
    with pytest.raises(HeadMismatchError, match="weights"):
        load_adapter(path, load_model("test_tiny_lite", device="cpu", seed=1))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_adapter(bad, trained["base"])
    payload = torch.load(path, weights_only=True)
    key = next(k for k in payload["state"] if ".adapter." in k)
    payload["state"][key] = payload["state"][key] + 1.0
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="hash"):
        load_adapter(tmp_path / "edited.pt", trained["base"])
    del payload["state"][key]
    torch.save(payload, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_adapter(tmp_path / "short.pt", trained["base"])
    payload["format"] = "napari-medsam-head/1"
    torch.save(payload, tmp_path / "head.pt")
    with pytest.raises(CheckpointError, match="head"):
        load_adapter(tmp_path / "head.pt", trained["base"])
    with pytest.raises(CheckpointError, match="not found"):
        load_adapter(tmp_path / "missing.pt", trained["base"])


def test_estimate_times_a_step_and_changes_nothing(tiny_lite):
    before = {k: v.clone() for k, v in tiny_lite.model.state_dict().items()}
    est = estimate_seconds(tiny_lite, AdapterConfig(sd_trans=True), AdaptParams(steps=10, threads=1), n_slices=3)
    assert est["step_s"] > 0 and est["total_s"] >= 10 * est["step_s"]
    for k, v in tiny_lite.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(p.requires_grad for p in tiny_lite.model.parameters())


def test_bad_configurations_are_refused():
    with pytest.raises(MedSamError, match="unknown adapter"):
        AdapterConfig(kind="prefix")
    with pytest.raises(MedSamError, match="rank"):
        AdapterConfig(kind="lora", rank=0)


def test_int8_model_does_not_train(mni_small):
    t1, lab = mni_small
    q = load_model("test_tiny_lite", device="cpu", int8=True)
    with pytest.raises(MedSamError, match="int8"):
        drain(train_adapters(VolumeEncoder(q, t1, axis=1), lab, [3]))
