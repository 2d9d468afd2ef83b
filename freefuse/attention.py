"""Scaled dot-product attention with the FreeFuse bias, in two forms.

``channels`` (the default): the bias ``sum_r u_r(i) v_r(j)`` rides in R extra query/key channels,

    softmax(q k^T * s + U V^T) = softmax([q, U / s] [k, V]^T * s)

so the attention call is an ordinary mask-free one (the same kernels as a plain generation, flash attention
included) and no L_q x L_k tensor exists. The head dimension grows by R (at most 2 per subject), rounded up to
a multiple of 8 with zero channels (what fused kernels want); the value gets zero channels to the same width,
which the output drops.

``dense``: the bias as an additive ``[B, 1, L_q, L_k]`` mask, the fallback where the padded head dimension is
not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from freefuse.bias import BiasFactors

CHANNEL_MULTIPLE = 8


def padded_head_dim(head_dim: int, rank: int) -> int:
    """The head dimension of the channels form: head_dim + rank, rounded up to a multiple of 8."""
    return -(-(head_dim + rank) // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE


def attention_bias_channels(
    q: Tensor, k: Tensor, v: Tensor, factors: BiasFactors, scale: float | None = None
) -> Tensor:
    """Attention with the bias in extra channels.

    q ``[B, H, L_q, D]``, k and v ``[B, H, L_k, D]``; ``factors.query`` ``[B, L_q, R]`` and ``factors.key``
    ``[B, L_k, R]`` (the same for every head). Returns ``[B, H, L_q, D]`` in q's dtype.
    """
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    width = padded_head_dim(head_dim, factors.rank)
    batch, heads = q.shape[:2]
    work = torch.promote_types(q.dtype, torch.float32)  # divide at float32 precision at least
    extra_q = (factors.query.to(device=q.device, dtype=work) / scale).to(q.dtype)  # [B, L_q, R]
    extra_k = factors.key.to(device=k.device, dtype=k.dtype)  # [B, L_k, R]
    pad = width - head_dim - factors.rank
    q_wide = F.pad(torch.cat([q, extra_q[:, None].expand(batch, heads, -1, -1)], dim=-1), (0, pad))
    k_wide = F.pad(torch.cat([k, extra_k[:, None].expand(batch, heads, -1, -1)], dim=-1), (0, pad))
    v_wide = F.pad(v, (0, width - head_dim))
    out = F.scaled_dot_product_attention(q_wide, k_wide, v_wide, scale=scale)  # [B, H, L_q, width]
    return out[..., :head_dim]


def attention_bias_dense(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float | None = None) -> Tensor:
    """Attention with the bias as an additive mask: q ``[B, H, L_q, D]``, k/v ``[B, H, L_k, D]``, bias
    ``[B, L_q, L_k]`` (broadcast over heads). Returns ``[B, H, L_q, D]``."""
    mask = bias.to(dtype=q.dtype, device=q.device).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
