"""SAM's prompt encoder, two-way transformer and mask decoder, plus the :class:`SamModel` wrapper.

Parameter names match the segment-anything / MedSAM / LiteMedSAM checkpoints. Coordinates inside
this module are SAM's: points ``(x, y)`` in the model's input pixel frame, boxes ``XYXY``.
Nothing outside :mod:`napari_medsam.core.segment` should call these with user coordinates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm2d, MLPBlock, apply_act


class PositionEmbeddingRandom(nn.Module):
    """Fourier-feature positional encoding with a fixed random Gaussian matrix (trained value loaded)."""

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:  # coords in [0, 1]
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:  # -> (C, H, W)
        h, w = size
        m = self.positional_encoding_gaussian_matrix
        grid = torch.ones((h, w), device=m.device, dtype=m.dtype)
        y = (grid.cumsum(0) - 0.5) / h
        x = (grid.cumsum(1) - 0.5) / w
        return self._pe_encoding(torch.stack([x, y], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        coords = coords.clone()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._pe_encoding(coords.to(self.positional_encoding_gaussian_matrix.dtype))


class PromptEncoder(nn.Module):
    def __init__(self, *, embed_dim: int, image_embedding_size: tuple[int, int],
                 input_image_size: tuple[int, int], mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0/1: negative/positive point, 2/3: box top-left/bottom-right corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:  # (1, C, h, w)
        """The positional encoding of the embedding grid: a constant of the weights, cached outside autograd.

        The cached tensor is a channels-last ``(1, h, w, C)`` array seen as ``(1, C, h, w)``, so
        that the decoder's ``(1, h*w, C)`` view of it is contiguous.
        """
        m = self.pe_layer.positional_encoding_gaussian_matrix
        if torch.is_grad_enabled():
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        key = (m.data_ptr(), m._version, m.device, m.dtype, tuple(self.image_embedding_size))
        cached = getattr(self, "_dense_pe", None)  # (key, tensor): a tuple, so not a module buffer
        if cached is None or cached[0] != key:
            pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
            self._dense_pe = cached = (key, pe.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))
        return cached[1]

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centre
        if pad:
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight.expand_as(emb), emb)
        emb = emb + torch.where(lab == 0, self.point_embeddings[0].weight, torch.zeros_like(emb))
        return emb + torch.where(lab == 1, self.point_embeddings[1].weight, torch.zeros_like(emb))

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        emb[:, 0, :] += self.point_embeddings[2].weight[0]
        emb[:, 1, :] += self.point_embeddings[3].weight[0]
        return emb

    def forward(self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None,
                masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts. points: ((B, N, 2) xy, (B, N) labels); boxes (B, 4) XYXY; masks (B, 1, 4h, 4w) logits."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        w = self.no_mask_embed.weight
        sparse = torch.empty((bs, 0, self.embed_dim), device=w.device, dtype=w.dtype)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = w.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense


class AttentionQKV(nn.Module):
    """Attention with separate q/k/v projections and optional channel downsampling (SAM decoder)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int,
                 skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = AttentionQKV(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = AttentionQKV(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = AttentionQKV(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def attend_tokens(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """The tokens' self-attention (first layer: without positional encoding, no residual)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.norm1(queries)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self.attend_tokens(queries, query_pe)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, *, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = AttentionQKV(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor,
                outputs: list[int] | None = None, *, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding (B, C, h, w), image_pe (B|1, C, h, w), tokens (B, N, C) -> (tokens, keys (B, hw, C)).

        ``outputs``: return only these tokens (the final attention updates each token on its own,
        so the folded path then computes it for these alone). ``fast=False``: the reference
        formulation even where the folded one applies (see :func:`use_folded`).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        if use_folded(self, point_embedding, fast=fast):
            return self._forward_folded(keys, key_pe, point_embedding, outputs)
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return (queries if outputs is None else queries[:, outputs]), keys

    def _forward_folded(self, keys: torch.Tensor, key_pe: torch.Tensor, point_embedding: torch.Tensor,
                        outputs: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` for a few tokens, with the projections folded onto the token side.

        Same arithmetic up to round-off (see :func:`_token_to_image` and :func:`_image_to_token`);
        the image side never goes through a 256 -> 128 projection, which with ~7 tokens is most of
        the decoder's work. Inference only (``use_folded``).
        """
        keys = keys.contiguous()  # no copy when the caller laid the image out channels-last
        key_pe = key_pe.contiguous()  # likewise for get_dense_pe()'s cached encoding
        queries = point_embedding
        for layer in self.layers:
            queries = layer.attend_tokens(queries, point_embedding)
            k_in = keys + key_pe  # also the image->token queries: keys do not change in between
            queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image,
                                                            queries + point_embedding, k_in, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            upd = _image_to_token(layer.cross_attn_image_to_token, k_in, queries + point_embedding, queries)
            keys = F.layer_norm(upd.add_(keys), (keys.shape[-1],), layer.norm4.weight, layer.norm4.bias,
                                layer.norm4.eps)
        if outputs is not None:
            queries, point_embedding = queries[:, outputs], point_embedding[:, outputs]
        queries = self.norm_final_attn(queries + _token_to_image(self.final_attn_token_to_image,
                                                                 queries + point_embedding, keys + key_pe, keys))
        return queries, keys


#: Token counts up to which the folded decoder is used (8 heads x 16 tokens = the 128-wide projection).
FOLD_MAX_TOKENS = 16


def use_folded(transformer: TwoWayTransformer, tokens: torch.Tensor, *, fast: bool = True) -> bool:
    """Whether :meth:`TwoWayTransformer._forward_folded` applies: ``fast``, no autograd, CPU, a few tokens.

    ``fast=False`` (the decoder's ``fast`` argument) keeps the reference formulation, which the
    benchmarks time beside ours. On a GPU the fused attention kernels are kept: the folded path
    is not measured there (CPU figures: docs/benchmarks.md).
    """
    return (fast and not torch.is_grad_enabled() and tokens.device.type == "cpu"
            and tokens.shape[1] <= FOLD_MAX_TOKENS and len(transformer.layers) > 0)


def _heads_of(w: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection weight ``(H*d, C)`` as ``(H, d, C)``."""
    return w.view(heads, w.shape[0] // heads, w.shape[1])


def _token_to_image(attn: AttentionQKV, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """``attn(q_in, k_in, v_in)`` for a few queries ``(B, N, C)`` over many keys ``(B, M, C)``.

    Per head h (``d`` channels, scale ``s``): scores ``s * q_h (W_k,h k_in^T + b_k,h)``; the bias
    term is constant along the keys, so it leaves the softmax unchanged and is dropped, and
    ``G = s * q_h W_k,h`` (``N x C``) meets the keys directly: one ``(H*N, C) x (C, M)`` product.
    The values: rows of the softmax sum to one, so ``A_h (v_in W_v,h^T + b_v,h) = (A_h v_in) W_v,h^T
    + b_v,h``: one ``(H*N, M) x (M, C)`` product. The ``M x C -> M x C/2`` projections are never formed.
    """
    h = attn.num_heads
    b, n, _ = q_in.shape
    q = attn.q_proj(q_in)  # (B, N, H*d)
    d = q.shape[-1] // h
    wk = _heads_of(attn.k_proj.weight, h)  # (H, d, C)
    g = torch.einsum("bnhd,hdc->bhnc", q.view(b, n, h, d), wk).mul_(d ** -0.5)  # (B, H, N, C)
    scores = torch.matmul(g.reshape(b, h * n, -1), k_in.transpose(1, 2))  # (B, H*N, M)
    a = scores.softmax(-1)
    r = torch.matmul(a, v_in).view(b, h, n, -1)  # (B, H, N, C)
    wv = _heads_of(attn.v_proj.weight, h)
    out = torch.einsum("bhnc,hdc->bnhd", r, wv).reshape(b, n, h * d) + attn.v_proj.bias
    return attn.out_proj(out)


def _image_to_token(attn: AttentionQKV, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """``attn(q_in, k_in, v_in)`` for many queries ``(B, M, C)`` over a few keys ``(B, N, C)``.

    Scores per head: ``s (q_in W_q,h^T + b_q,h) k_h^T = q_in (s W_q,h^T k_h^T) + s b_q,h k_h^T``, a
    ``(M, C) x (C, H*N)`` product plus a bias per key; the output projection folds into the
    values, ``sum_h A_h v_h W_o,h^T = A (V W_o^T)``: one ``(M, H*N) x (H*N, C)`` product.
    """
    h = attn.num_heads
    b, n, _ = k_in.shape
    k = attn.k_proj(k_in)  # (B, N, H*d)
    v = attn.v_proj(v_in)
    d = k.shape[-1] // h
    kh = k.view(b, n, h, d)
    wq = _heads_of(attn.q_proj.weight, h)  # (H, d, C)
    mt = torch.einsum("bnhd,hdc->bhnc", kh, wq).mul_(d ** -0.5).reshape(b, h * n, -1)  # (B, H*N, C)
    bias = torch.einsum("bnhd,hd->bhn", kh, attn.q_proj.bias.view(h, d)).mul_(d ** -0.5).reshape(b, h * n, 1)
    # scores keys-major (B, H*N, M): the softmax over a head's N keys then runs along whole rows of M
    scores = torch.baddbmm(bias, mt, q_in.transpose(1, 2))
    a = scores.view(b, h, n, -1).softmax(2).view(b, h * n, -1)
    wo = attn.out_proj.weight.view(-1, h, d)  # (C, H, d)
    u = torch.einsum("bnhd,chd->bhnc", v.view(b, n, h, d), wo).reshape(b, h * n, -1)  # (B, H*N, C)
    return torch.baddbmm(attn.out_proj.bias.expand(b, 1, -1), a.transpose(1, 2), u)


class MaskDecoder(nn.Module):
    def __init__(self, *, transformer_dim: int, transformer: TwoWayTransformer, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        # optional hook: a nets.adapters.HypAdapter on the output tokens, conditioned on the prompt tokens
        self.token_adapter = None

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool, *,
                fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings (B|1, C, h, w) with prompts (B, N, C)/(B, C, h, w) -> logits (B, M, 4h, 4w), iou (B, M).

        ``fast``: the CPU inference fast paths (folded attention, channels-last upscaling) where
        they apply; ``False`` runs the reference modules (same masks up to round-off)."""
        sl = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                        outputs=sl, fast=fast)
        return masks, iou[:, sl]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                      dense: torch.Tensor, outputs: slice | None = None, *,
                      fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the mask tokens in ``outputs`` (all by default) and every token's IoU prediction.

        At inference on a CPU only those mask tokens are upscaled."""
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        out_tokens = out_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        tokens = torch.cat([out_tokens.to(sparse.dtype), sparse], dim=1)  # (B, 1+M+N, C)
        bsz = tokens.shape[0]
        src = image_embeddings if image_embeddings.shape[0] == bsz else image_embeddings.expand(bsz, -1, -1, -1)
        fast = fast and not torch.is_grad_enabled() and src.device.type == "cpu"
        if fast:  # the sum laid out channels-last: the transformer's (B, h*w, C) view of it is contiguous
            out = torch.empty(src.shape, dtype=torch.result_type(src, dense), device=src.device,
                              memory_format=torch.channels_last)
            src = torch.add(src, dense, out=out)
        else:
            src = src + dense
        pos = image_pe.expand(bsz, -1, -1, -1)
        b, c, h, w = src.shape
        if fast:  # only the IoU token and the mask tokens asked for leave the transformer
            idx = list(range(self.num_mask_tokens)[outputs if outputs is not None else slice(None)])
            hs, src = self.transformer(src, pos, tokens, outputs=[0] + [1 + i for i in idx], fast=True)
            if self.token_adapter is not None:
                hs = self.token_adapter(hs, sparse)
            hyper = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + j, :]) for j, i in enumerate(idx)], dim=1)
            iou = self.iou_prediction_head(hs[:, 0, :])
            return self._masks_channels_last(src, hyper, h, w), iou
        hs, src = self.transformer(src, pos, tokens, fast=False)
        if self.token_adapter is not None:
            hs = self.token_adapter(hs, sparse)
        iou_out = hs[:, 0, :]
        mask_out = hs[:, 1:1 + self.num_mask_tokens, :]
        hyper = torch.stack([mlp(mask_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        b, c8, uh, uw = upscaled.shape
        masks = (hyper @ upscaled.view(b, c8, uh * uw)).view(b, -1, uh, uw)
        return (masks if outputs is None else masks[:, outputs]), self.iou_prediction_head(iou_out)

    def _masks_channels_last(self, src: torch.Tensor, hyper: torch.Tensor, h: int, w: int,
                             block: int = 512) -> torch.Tensor:
        """``hyper @ output_upscaling(src)`` from channels-last tokens ``(B, h*w, C)``, inference only.

        A kernel-2 stride-2 transposed convolution gives each input pixel its own 2x2 output
        pixels: a matrix product with the weight laid out ``(C_in, 2*2*C_out)``. LayerNorm and GELU
        act per pixel, so the sub-pixel layout ``(B, h, w, 2, 2, 2, 2, C/8)`` is kept through both
        stages and only the final masks (``M`` channels instead of ``C/8``) are shuffled to
        ``(B, M, 4h, 4w)``. Tokens go through in blocks of ``block``, whose intermediates (16x the
        pixels at C/8 channels) stay in the CPU's cache instead of making three round trips to
        memory. Same arithmetic as the NCHW modules, up to round-off (the blocking's
        gain: docs/benchmarks.md).
        """
        ct1, ln, act1, ct2, act2 = self.output_upscaling
        b, n, c = src.shape
        c4, c8 = ct1.out_channels, ct2.out_channels
        w1 = ct1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c4)  # (C, [a, c] x C/4)
        w2 = ct2.weight.permute(0, 2, 3, 1).reshape(c4, 4 * c8)
        b1, b2 = ct1.bias.repeat(4), ct2.bias.repeat(4)
        m = hyper.shape[1]
        out = torch.empty(b, n * 16, m, dtype=src.dtype, device=src.device)
        for i in range(b):
            hy = hyper[i].t()  # (C/8, M)
            for s in range(0, n, block):
                y = torch.addmm(b1, src[i, s:s + block], w1).view(-1, c4)  # (4 * block, C/4)
                y = apply_act(act1, F.layer_norm(y, (c4,), ln.weight, ln.bias, ln.eps))
                y = apply_act(act2, torch.addmm(b2, y, w2)).view(-1, c8)  # (16 * block, C/8)
                torch.mm(y, hy, out=out[i, 16 * s:16 * (s + y.shape[0] // 16)])
        # (b, i, j, a1, c1, a2, c2, m) -> (b, m, i, a1, a2, j, c1, c2): row 4i+2a1+a2, column 4j+2c1+c2
        masks = out.view(b, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(b, m, 4 * h, 4 * w)


class SamModel(nn.Module):
    """Image encoder + prompt encoder + mask decoder; normalisation and resizing live in ``preprocess``."""

    def __init__(self, *, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)
