"""core/nets/common.py: the fused bf16 linear layers at CPU inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_medsam.core.nets import common


def _ref(m: nn.Module, x: torch.Tensor, act: nn.Module | None) -> torch.Tensor:
    w = m.weight.flatten(1)
    y = F.linear(x.float(), w, m.bias)
    return y if act is None else act(y)


@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
@pytest.mark.parametrize("act", [None, nn.GELU()])
def test_fused_bf16_linear_matches_fp32_within_bf16_rounding(monkeypatch, kind, act):
    torch.manual_seed(0)
    m = nn.Linear(48, 40) if kind == "linear" else nn.Conv2d(48, 40, 1)
    x = torch.randn(2, 9, 7, 48)
    calls = []
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN linear op in this torch build")
    monkeypatch.setattr(common, "_linear_op", lambda *a: calls.append(a[3]) or op(*a))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = common.linear(m, x, act)
    assert calls == ["none" if act is None else "gelu"]  # the fused call ran, with the activation
    assert y.dtype == torch.bfloat16 and y.shape == (2, 9, 7, 40)
    ref = _ref(m, x, act)
    assert (y.float() - ref).abs().max() < 0.02 * ref.abs().max() + 0.02


def test_weights_copy_follows_the_parameters():
    torch.manual_seed(0)
    m = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = common.linear(m, x)
    with torch.no_grad():
        m.weight.mul_(-1.0)  # an optimiser step or load_state_dict: in place
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        b = common.linear(m, x)
    assert torch.allclose(b.float(), _ref(m, x, None), atol=0.05)
    assert not torch.allclose(a.float(), b.float(), atol=0.05)


def test_fp32_autograd_and_other_modules_take_the_plain_path(monkeypatch):
    monkeypatch.setattr(common, "_linear_op", lambda *a: pytest.fail("fused op used"))
    m = nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    y = common.linear(m, x, nn.GELU())  # fp32, autograd on
    assert torch.allclose(y, F.gelu(m(x)))
    y.sum().backward()
    assert m.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        seq = nn.Sequential(nn.Linear(16, 8))  # not an nn.Linear itself: called as it is
        assert common.linear(seq, x).shape == (5, 8)
