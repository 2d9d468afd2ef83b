"""Scaled dot-product attention with the FreeFuse bias, in two forms.

``channels``: the bias ``sum_r u_r(i) v_r(j)`` rides in R extra query/key channels,

    softmax(q k^T * s + U V^T) = softmax([q, U / s] [k, V]^T * s)

so the attention call is an ordinary mask-free one (PyTorch's scaled_dot_product_attention picks its fused
kernels, flash attention included, as for a call without a bias) and no L_q x L_k tensor exists. The head
dimension grows by R (at most 2 per subject), rounded up to a multiple of 8 with zero channels (what fused
kernels want); the value gets zero channels to the same width, which the output drops.

``dense``: the bias as an additive ``[B, 1, L_q, L_k]`` mask. Both forms call PyTorch's SDPA directly, whatever
attention backend Forge uses elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from freefuse.bias import BiasFactors

CHANNEL_MULTIPLE = 8


def padded_head_dim(head_dim: int, rank: int) -> int:
    """The head dimension of the channels form: head_dim + rank, rounded up to a multiple of 8."""
    return -(-(head_dim + rank) // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE


@dataclass(frozen=True)
class ChannelExtras:
    """The bias of one call as extra channels, zero-padded to a multiple of 8: ``query`` ``[B, L_q, P]`` already
    divided by the softmax scale, ``key`` ``[B, L_k, P]``. Built once per call shape, used by every layer."""

    query: Tensor
    key: Tensor
    scale: float


def channel_extras(
    factors: BiasFactors, head_dim: int, dtype: torch.dtype, device=None, scale: float | None = None
) -> ChannelExtras:
    """The extra channels of ``factors`` for heads of ``head_dim`` in ``dtype``: U / scale and V, padded so
    that head_dim plus them is a multiple of 8 (the division at float32 precision at least)."""
    scale = head_dim**-0.5 if scale is None else scale
    pad = padded_head_dim(head_dim, factors.rank) - head_dim - factors.rank
    work = torch.promote_types(dtype, torch.float32)
    query = F.pad(factors.query.to(device=device, dtype=work) / scale, (0, pad)).to(dtype)  # [B, L_q, P]
    key = F.pad(factors.key.to(device=device, dtype=work), (0, pad)).to(dtype)  # [B, L_k, P]
    return ChannelExtras(query, key, scale)


def attention_bias_channels(q: Tensor, k: Tensor, v: Tensor, extras: ChannelExtras) -> Tensor:
    """Attention with the bias in extra channels.

    q ``[B, H, L_q, D]``, k and v ``[B, H, L_k, D]``; ``extras`` from ``channel_extras`` (the same for every head).
    Returns ``[B, H, L_q, D]`` in q's dtype.
    """
    batch, heads, _, head_dim = q.shape
    q_wide = torch.cat([q, extras.query[:, None].expand(batch, heads, -1, -1)], dim=-1)  # [B, H, L_q, D + P]
    k_wide = torch.cat([k, extras.key[:, None].expand(batch, heads, -1, -1)], dim=-1)  # [B, H, L_k, D + P]
    v_wide = F.pad(v, (0, extras.query.shape[-1]))  # [B, H, L_k, D + P]
    out = F.scaled_dot_product_attention(q_wide, k_wide, v_wide, scale=extras.scale)
    return out[..., :head_dim]


def attention_bias_dense(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float | None = None) -> Tensor:
    """Attention with the bias as an additive mask: q ``[B, H, L_q, D]``, k/v ``[B, H, L_k, D]``, bias
    ``[B, L_q, L_k]`` (broadcast over heads). Returns ``[B, H, L_q, D]``."""
    mask = bias.to(dtype=q.dtype, device=q.device).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
