"""Parameter-efficient adaptation modules: bottleneck adapters, SD-Trans depth attention, HyP-Adpt, LoRA.

Written for napari-medsam from the published descriptions (Medical SAM Adapter, Wu et al. 2023,
arXiv 2304.12620; LoRA on q and v as in SAMed / H-SAM); no code was taken from their repositories.

The modules attach to optional hook points that are ``None`` in a plain network, so a block without
an adapter computes exactly what it did before:

* ``block.adapter`` (:class:`BlockAdapter`) in every transformer block of the SAM ViT
  (:class:`~napari_medsam.core.nets.vit.Block`) and of TinyViT
  (:class:`~napari_medsam.core.nets.tiny_vit.TinyViTBlock`):
  the attention output goes through an :class:`Adapter` with its own skip
  (``y <- y + A_space(y)``), the MLP gets a scaled adapter beside it
  (``x + MLP(LN(x)) + s * A_mlp(LN(x))``, ``s = 0.5``), and with SD-Trans a depth branch
  (:class:`DepthBranch`) adds attention along the slice axis.
* ``attn.lora`` (:class:`LoRAQV`) on the attention's qkv projection: low-rank updates of q and v.
* ``mask_decoder.token_adapter`` (:class:`HypAdapter`): the decoder's output tokens go through a
  bottleneck whose weights a small hypernetwork generates from the pooled prompt tokens.

Every up-projection (adapters, the depth adapter, LoRA's ``B``, the hypernetwork's up-weights)
starts at zero: an untrained adapter adds exact zeros and leaves embeddings and masks bit-identical.

SD-Trans. A depth-aware encoder takes ``(B, D, 3, S, S)``: ``D`` neighbouring slices, the one to
embed in the middle. :func:`enable_slice_stacks` registers hooks on the encoder that run the ``B*D``
slices as one batch with :func:`depth_context` set to ``D`` and return the centre slices'
embeddings ``(B, C, h, w)``. In each block the depth branch rearranges the *whole* token grid
``(B*D, H, W, C)`` (never the windows) to ``(B*H*W, D, C)``, attends along ``D`` with the block's
own frozen q/k/v and output projections (no position bias), passes the result through a depth
adapter (no skip, zero-initialised) and adds it to the spatial attention's output. A plain
``(B, 3, S, S)`` call runs with ``D = 1`` and no depth branch.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .common import apply_act

__all__ = [
    "Adapter", "BlockAdapter", "DepthBranch", "HypAdapter", "LoRAQV", "current_depth", "depth_context",
    "enable_slice_stacks", "qkv_layout",
]


class Adapter(nn.Module):
    """Bottleneck ``D -> round(ratio * D) -> D`` with GELU; the up-projection starts at zero.

    ``skip``: return ``x + up(gelu(down(x)))`` (the attention adapter) instead of the branch alone.
    """

    def __init__(self, dim: int, ratio: float = 0.25, *, skip: bool) -> None:
        super().__init__()
        hidden = max(1, int(round(dim * ratio)))
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(apply_act(self.act, self.down(x)))
        return x + y if self.skip else y


# ---------------------------------------------------------------------------------------------- depth

_DEPTH = threading.local()


def current_depth() -> int:
    """Slices per stack for the encoder call running in this thread (1: plain slices)."""
    return int(getattr(_DEPTH, "d", 1))


@contextlib.contextmanager
def depth_context(d: int) -> Iterator[None]:
    """Run encoder blocks on a batch made of stacks of ``d`` neighbouring slices (slice-major)."""
    prev = current_depth()
    _DEPTH.d = int(d)
    try:
        yield
    finally:
        _DEPTH.d = prev


def _stack_pre_hook(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if x.dim() == 5:  # (B, D, 3, S, S): D neighbouring slices per item
        _DEPTH.d = int(x.shape[1])
        return (x.reshape(-1, *x.shape[2:]), *args[1:])
    _DEPTH.d = 1  # always set here: a call that raised never leaves a stale depth behind
    return None


def _stack_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    d = current_depth()
    _DEPTH.d = 1
    if d > 1:
        return out.view(-1, d, *out.shape[1:])[:, d // 2]  # (B, C, h, w): the centre slices
    return out


def enable_slice_stacks(encoder: nn.Module) -> list:
    """Let ``encoder`` take ``(B, D, 3, S, S)`` stacks and return the centre slices' embeddings.

    Returns the hook handles (``handle.remove()`` undoes it). Module-level hook functions, so a
    ``copy.deepcopy`` of the encoder keeps working stacks.
    """
    return [encoder.register_forward_pre_hook(_stack_pre_hook), encoder.register_forward_hook(_stack_hook)]


def qkv_layout(attn: nn.Module) -> str:
    """How ``attn.qkv``'s ``3 * C`` outputs are ordered: ``"qkv"`` (SAM ViT: all q, all k, all v) or
    ``"head"`` (TinyViT: q, k, v of head 0, then of head 1, ...)."""
    from .tiny_vit import WindowAttention

    return "head" if isinstance(attn, WindowAttention) else "qkv"


def project_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``attn``'s qkv projection of tokens ``x`` (..., C), with its norm (TinyViT) and its LoRA."""
    if qkv_layout(attn) == "head":
        x = attn.norm(x)
    qkv = attn.qkv(x)
    lora = getattr(attn, "lora", None)
    return lora(x, qkv) if lora is not None else qkv


def _split_qkv(qkv: torch.Tensor, heads: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, L, 3C)`` -> q, k, v ``(N, heads, L, C / heads)``."""
    n, length, c3 = qkv.shape
    hd = c3 // 3 // heads
    if layout == "head":
        q, k, v = qkv.view(n, length, heads, 3 * hd).permute(0, 2, 1, 3).split(hd, dim=3)
        return q, k, v
    q, k, v = qkv.view(n, length, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


class DepthBranch(nn.Module):
    """SD-Trans: attention along the slice axis per spatial token, then a depth adapter (no skip).

    Uses the block's own (frozen) attention projections; only ``adapter`` is trained.
    """

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        self.adapter = Adapter(dim, ratio, skip=False)

    def forward(self, attn: nn.Module, x: torch.Tensor, d: int) -> torch.Tensor:
        """``x``: block input tokens ``(B*D, H, W, C)`` as the attention takes them, slice-major."""
        bd, h, w, c = x.shape
        b = bd // d
        t = x.view(b, d, h, w, c).permute(0, 2, 3, 1, 4).reshape(b * h * w, d, c)  # (B*H*W, D, C)
        q, k, v = _split_qkv(project_qkv(attn, t), attn.num_heads, qkv_layout(attn))
        out = F.scaled_dot_product_attention(q, k, v)  # (B*H*W, heads, D, hd)
        out = attn.proj(out.transpose(1, 2).reshape(b * h * w, d, c))
        out = self.adapter(out)
        return out.view(b, h, w, d, c).permute(0, 3, 1, 2, 4).reshape(bd, h, w, c)


class BlockAdapter(nn.Module):
    """The adapters of one transformer block: ``space`` after attention, ``mlp`` beside the MLP
    (scaled by ``scale``), ``depth`` (SD-Trans). Each is optional (None: that path is untouched)."""

    def __init__(self, dim: int, *, ratio: float = 0.25, scale: float = 0.5, space: bool = True,
                 mlp: bool = True, depth: bool = False) -> None:
        super().__init__()
        self.space = Adapter(dim, ratio, skip=True) if space else None
        self.mlp = Adapter(dim, ratio, skip=False) if mlp else None
        self.depth = DepthBranch(dim, ratio) if depth else None
        self.scale = float(scale)

    def after_attention(self, attn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y``: the spatial attention's output ``(B, H, W, C)`` for block input ``x`` (as ``attn`` takes it)."""
        if self.space is not None:
            y = self.space(y)
        d = current_depth()
        if self.depth is not None and d > 1:
            y = y + self.depth(attn, x, d)
        return y

    def beside_mlp(self, x_norm: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``m``: the MLP's output for the normalised tokens ``x_norm``."""
        if self.mlp is None:
            return m
        return m + self.scale * self.mlp(x_norm)


# ---------------------------------------------------------------------------------------------- LoRA


class LoRAQV(nn.Module):
    """Low-rank updates ``B A x`` of the q and v parts of a fused qkv projection (k untouched).

    ``A`` (rank x C) Kaiming-uniform as ``nn.Linear`` initialises, ``B`` (C x rank) zero; no scaling
    (SAMed's convention). ``layout``: see :func:`qkv_layout`.
    """

    def __init__(self, dim: int, rank: int, *, heads: int, layout: str) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.heads, self.layout, self.rank = int(heads), layout, int(rank)
        self.a_q = nn.Linear(dim, rank, bias=False)
        self.b_q = nn.Linear(rank, dim, bias=False)
        self.a_v = nn.Linear(dim, rank, bias=False)
        self.b_v = nn.Linear(rank, dim, bias=False)
        for a in (self.a_q, self.a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.b_q, self.b_v):
            nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv`` (..., 3C) of input ``x`` (..., C) -> with the low-rank q and v updates added."""
        dq = self.b_q(self.a_q(x))
        dv = self.b_v(self.a_v(x))
        if self.layout == "head":
            shape = (*dq.shape[:-1], self.heads, dq.shape[-1] // self.heads)
            dq, dv = dq.view(shape), dv.view(shape)
            delta = torch.stack([dq, torch.zeros_like(dq), dv], dim=-2).flatten(-3)  # (..., heads, 3, hd)
        else:
            delta = torch.stack([dq, torch.zeros_like(dq), dv], dim=-2).flatten(-2)  # (..., 3, C)
        return qkv + delta.to(qkv.dtype)


# ---------------------------------------------------------------------------------------------- HyP-Adpt


class HypAdapter(nn.Module):
    """HyP-Adpt: a bottleneck on the decoder's output tokens whose weights come from the prompt.

    The sparse prompt tokens (points, box corners) of each object are averaged and normalised; a
    small hypernetwork (``C -> hidden``, GELU) generates the bottleneck's down weights
    ``(rank, C)`` + bias and up weights ``(C, rank)`` + bias; the tokens get
    ``t + up_p(gelu(down_p(t)))``. The generator of the up weights starts at zero (identity).
    Objects without sparse prompts (a mask prompt alone, prompt-free heads) pass unchanged.
    """

    def __init__(self, dim: int, *, rank: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.dim, self.rank = int(dim), int(rank)
        self.norm = nn.LayerNorm(dim)
        self.hyper = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.gen_down = nn.Linear(hidden, rank * dim + rank)
        self.gen_up = nn.Linear(hidden, dim * rank + dim)
        nn.init.zeros_(self.gen_up.weight)
        nn.init.zeros_(self.gen_up.bias)

    def forward(self, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, T, C) adapted with weights from ``prompts`` (B, N, C)."""
        if prompts.shape[1] == 0:
            return tokens
        b, c, r = tokens.shape[0], self.dim, self.rank
        h = self.act(self.hyper(self.norm(prompts.mean(1))))  # (B, hidden)
        gd, gu = self.gen_down(h), self.gen_up(h)
        w_down = gd[:, :r * c].view(b, r, c) * c ** -0.5  # scaled like a fan-in initialisation
        z = torch.einsum("btc,brc->btr", tokens, w_down.to(tokens.dtype)) + gd[:, None, r * c:].to(tokens.dtype)
        z = self.act(z)
        w_up = gu[:, :c * r].view(b, c, r)
        out = torch.einsum("btr,bcr->btc", z, w_up.to(z.dtype)) + gu[:, None, c * r:].to(z.dtype)
        return tokens + out.to(tokens.dtype)
