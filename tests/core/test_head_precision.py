"""The heads' precision and fast prediction paths (issue 16 item 4): which precision runs where
(``core.device.head_precision``), that it is recorded, that bf16 and fp32, channels-last and plain
layouts give the same masks on the tiny model, and the bf16 path where the CPU has native bf16.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_medsam.core.build import load_model
from napari_medsam.core.device import cpu_has_fast_bf16, head_precision, precision_name
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.errors import DeviceError
from napari_medsam.core.finetune import TrainParams, collect_training_data, fine_tune
from napari_medsam.core.infer import _inference_module, class_argmax, predict_slices
from napari_medsam.core.progress import drain
from tests._helpers import drain_steps, two_structures

SHAPE = (6, 33, 35)
# whole slices, no augmentation: the tiny model's head learns the two boxes in 40 steps
CNN = {"head": "cnn", "head_config": {"width": 16}, "epochs": 40, "batch_size": 2, "patience": 0, "augment": False,
       "crop": 0, "lr": 1e-2}


@pytest.fixture(scope="module")
def volume():
    return two_structures(SHAPE, seed=3)


@pytest.fixture(scope="module")
def encoder(loaded, volume):
    return VolumeEncoder(loaded, volume[0], axis=0)


@pytest.fixture(scope="module")
def data(encoder, volume):
    return drain(collect_training_data(encoder, volume[1], [1, 4]))


@pytest.fixture(scope="module")
def head(data, loaded):
    return drain(fine_tune(data, TrainParams(**CNN), loaded=loaded))


def test_head_precision_rules(loaded):
    bf16_model = SimpleNamespace(dtype=torch.bfloat16)
    checked = SimpleNamespace(bf16=True, bf16_training=False)
    unchecked = SimpleNamespace(bf16=False, bf16_training=False)
    assert head_precision("auto", loaded, checked) is None  # the model runs fp32: so do its heads
    assert head_precision("auto", bf16_model, checked) is torch.bfloat16
    assert head_precision("auto", bf16_model, unchecked) is None  # a family not checked in bf16 stays fp32
    assert head_precision("auto", bf16_model, checked, training=True) is None  # checked for prediction only
    assert head_precision("auto", bf16_model, SimpleNamespace(bf16_training=True), training=True) is torch.bfloat16
    assert head_precision("bf16", bf16_model, checked, training=True) is torch.bfloat16
    assert head_precision("fp32", bf16_model, checked) is None
    assert head_precision("bf16", loaded, unchecked) is torch.bfloat16  # asked for: bf16 whatever the model
    assert head_precision("fp16", bf16_model, checked) is None
    with pytest.raises(DeviceError, match="unknown precision"):
        head_precision("int4", loaded, checked)
    assert (precision_name(None), precision_name(torch.bfloat16)) == ("fp32", "bf16")


def test_training_and_prediction_record_their_precision(data, encoder, loaded, head):
    assert head.meta.history["precision"] == "fp32"  # the tiny model loads fp32: auto stays fp32
    steps, bf = drain_steps(fine_tune(data, TrainParams(**{**CNN, "epochs": 2}, precision="bf16"), loaded=loaded))
    assert bf.meta.history["precision"] == "bf16" and {p.info["precision"] for p in steps} == {"bf16"}
    assert bf.meta.train_params["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in bf.module.parameters())  # weights stay fp32
    steps, res = drain_steps(predict_slices(encoder, head, precision="bf16"))
    assert res.precision == "bf16" and {p.info["precision"] for p in steps} == {"bf16"}
    assert drain(predict_slices(encoder, head)).precision == "fp32"


def test_bf16_and_fp32_predictions_agree(encoder, head, volume):
    a = drain(predict_slices(encoder, head, precision="fp32")).labels
    b = drain(predict_slices(encoder, head, precision="bf16")).labels
    assert (a == volume[1]).mean() > 0.9  # the head learnt the structures: not a test of two blank masks
    assert (a == b).mean() > 0.99


def test_channels_last_copy_gives_the_same_logits_and_leaves_the_head_alone(encoder, head):
    module = head.module
    fast = _inference_module(module)
    assert fast is not module
    emb = torch.cat([encoder.get(i) for i in (0, 2)])
    img = torch.from_numpy(np.stack([encoder.model_input(i) for i in (0, 2)]))
    with torch.inference_mode():
        ref = module(emb.contiguous(), img)
        out = fast(emb.contiguous(memory_format=torch.channels_last), img.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    drain(predict_slices(encoder, head))
    convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous() for w in convs)  # the trained head keeps its layout
    other = torch.nn.Identity()
    assert _inference_module(other) is other  # heads without the flag are used as they are


@pytest.mark.parametrize("k", [2, 3, 5])
def test_class_argmax_is_argmax(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, 17, 19, generator=g)
    x[0, :, 0, 0] = 1.0  # a tie: the first channel wins, as with argmax
    x[1, 1:, 2, 3] = 5.0
    got = class_argmax(x)
    assert got.dtype == torch.uint8
    assert torch.equal(got.long(), x.argmax(1))


def test_labels_without_probabilities_match_the_labels_with_them(encoder, head):
    a = drain(predict_slices(encoder, head)).labels
    b = drain(predict_slices(encoder, head, return_probs=True)).labels
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="the CPU has no native bf16 (AVX512-BF16 / AMX): heads run fp32")
def test_auto_runs_the_cnn_head_in_bf16_on_a_native_bf16_cpu(volume):
    auto = load_model("test_tiny_lite", device="cpu", precision="auto")
    assert auto.dtype is torch.bfloat16
    enc = VolumeEncoder(auto, volume[0], axis=0)
    data = drain(collect_training_data(enc, volume[1], [1, 4]))
    head = drain(fine_tune(data, TrainParams(**CNN), loaded=auto))
    assert head.meta.history["precision"] == "bf16"
    fp32 = drain(fine_tune(data, TrainParams(**CNN, precision="fp32"), loaded=auto))
    assert fp32.meta.history["precision"] == "fp32"  # asked for: fp32 on any CPU
    hsam = drain(fine_tune(data, TrainParams(head="hsam", epochs=1, batch_size=2, patience=0), loaded=auto))
    assert hsam.meta.history["precision"] == "fp32"  # a family not checked in bf16 stays fp32 under auto
    res = drain(predict_slices(enc, head))
    assert res.precision == "bf16"
    assert (res.labels == volume[1]).mean() > 0.9
    fp32 = drain(predict_slices(enc, head, precision="fp32")).labels
    assert (res.labels == fp32).mean() > 0.99
