"""Forge's `attention_function` with the PyTorch SDPA backend (`--attention-pytorch`).

Forge binds `attention_function` at import to xformers, SDPA, split or sub-quadratic attention; the
stand-in always uses SDPA. Like Forge's, it takes no probabilities out and, with skip_reshape=True,
expects q, k, v as [B, H, L, D] and returns [B, L, H*D].
"""

import torch


def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    if skip_reshape:
        batch, _, _, dim_head = q.shape
    else:
        batch, _, width = q.shape  # [B, L, H*D]
        dim_head = width // heads
        q, k, v = (t.view(batch, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
    return out.transpose(1, 2).reshape(batch, -1, heads * dim_head)  # [B, L, H*D]


attention_function = attention_pytorch
