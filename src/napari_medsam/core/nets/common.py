"""Small building blocks shared by the encoders and decoders."""

from __future__ import annotations

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
        return self.lin2(apply_act(self.act, self.lin1(x)))


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
