"""Small building blocks shared by the encoders and decoders."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def apply_act(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``, in place for GELU / ReLU when no autograd graph needs ``x`` (fresh temporaries only).

    Saves one full-size allocation per activation; a large fresh allocation is a new memory map
    that is page-faulted in, which costs more than the activation itself.
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        if type(act) is nn.GELU:
            return torch._C._nn.gelu_(x, approximate=act.approximate)
        if type(act) is nn.ReLU:
            return torch.relu_(x)
    return act(x)


#: CPU inference under bf16 autocast: a linear layer (and an exact GELU after it) as one oneDNN
#: call on bf16 copies of its weights, kept per layer while the parameters are unchanged. Autocast
#: casts the fp32 weights again on every call and runs the GELU as a second pass over the output;
#: measured 1.2-1.5x on the encoders' layer shapes. False: autocast's ops (tests).
FUSED_BF16_LINEAR = True
_linear_op: object = None  # torch.ops.mkldnn._linear_pointwise, or False where missing / failed


def bf16_autocast_inference(x: torch.Tensor) -> bool:
    """True under bf16 autocast on a CPU without autograd."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    try:
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16


def kept(m: nn.Module, name: str, make: Any, *tensors: torch.Tensor | None, extra: Any = None) -> Any:
    """``make()``, computed once and kept on ``m`` as ``name`` while ``tensors`` (parameters) are
    unchanged: the same storage and no in-place update since (an optimiser step, ``load_state_dict``),
    and the same ``extra`` key."""
    key = (tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors), extra)
    cached = getattr(m, name, None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, make())
        setattr(m, name, cached)
    return cached[1]


def bf16_weights(m: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                  flatten: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """bf16 copies of ``m``'s weight (``flatten``: as a matrix) and bias, kept on ``m`` while unchanged."""
    def make() -> tuple[torch.Tensor, torch.Tensor | None]:
        w = weight.detach()
        w = (w.reshape(w.shape[0], -1) if flatten else w).to(torch.bfloat16)
        return w, None if bias is None else bias.detach().to(torch.bfloat16)

    return kept(m, "_bf16_weights", make, weight, bias, extra=flatten)


def softmax_fp32(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of low-precision ``scores``, computed in fp32 and returned in their
    dtype. On short rows PyTorch's bf16-in, bf16-out CPU softmax is the slower one (TinyViT's
    49-token windows: 1.9-2.0 against 1.0-1.2 ns a score); on rows of 196 keys and more the bf16 one
    measured faster (:func:`softmax_`; docs/benchmarks.md, issue 18)."""
    return torch.softmax(scores, -1, dtype=torch.float32).to(scores.dtype)


def softmax_(s: torch.Tensor) -> torch.Tensor:
    """The softmax over the last axis of the scores ``s``, written into ``s`` (returned): the same values
    as ``torch.softmax(s, -1)`` (each row is read before it is written), without a second buffer of the
    piece's size, which was allocated and first touched at every call (global ViT-B pieces: 4 MB, 384 a
    slice); 1.06x on a global block's head bands measured (1 thread). Used by both encoders' bf16
    attention pieces."""
    return torch.softmax(s, -1, out=s)


def linear(m: nn.Module, x: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor:
    """``act(m(x))`` for an ``nn.Linear`` or a 1x1 ``nn.Conv2d`` ``m`` applied to the last axis of ``x``.

    Under bf16 autocast on a CPU at inference: one fused oneDNN call (:data:`FUSED_BF16_LINEAR`);
    otherwise ``F.linear`` and :func:`apply_act`. Any other module (a quantized or adapted layer) is
    called as it is.
    """
    global _linear_op
    if type(m) is nn.Linear or type(m) is nn.Conv2d:
        gelu = act is None or (type(act) is nn.GELU and act.approximate == "none")
        if gelu and FUSED_BF16_LINEAR and _linear_op is not False and bf16_autocast_inference(x):
            if _linear_op is None:
                _linear_op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", False) \
                    if torch.backends.mkldnn.is_available() else False
            if _linear_op:
                w, b = bf16_weights(m, m.weight, m.bias)
                try:
                    if act is None:
                        return _linear_op(x.to(torch.bfloat16), w, b, "none", [], "")  # type: ignore[operator]
                    return _linear_op(x.to(torch.bfloat16), w, b, "gelu", [None], "none")  # type: ignore[operator]
                except (RuntimeError, NotImplementedError):  # a oneDNN build without it: autocast from now on
                    _linear_op = False
        y = F.linear(x, m.weight.flatten(1) if type(m) is nn.Conv2d else m.weight, m.bias)
    else:
        y = m(x)
    return y if act is None else apply_act(act, y)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a ``(B, C, H, W)`` tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation for channels-last tokens ``(B, H, W, C)`` (one fused kernel)."""
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class MLPBlock(nn.Module):
    """Two-layer MLP with parameter names ``lin1``/``lin2`` (SAM's layout)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.lin2, linear(self.lin1, x, self.act))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (``layers.{i}``, SAM's hypernetworks)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 sigmoid_output: bool = False) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
