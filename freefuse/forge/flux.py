"""FLUX in Forge (backend/nn/flux.py): which layer holds which tokens, and where attention is reached.

Forge's FLUX has no patch points and ``transformer_options`` never reaches a block, so FreeFuse uses
PyTorch hooks on the shared modules plus one swap of the module-level ``backend.nn.flux.attention`` function,
which every double and single block looks up at call time. The joint sequence is ``[text | image]``; image
tokens are row-major over an ``(H/16) x (W/16)`` grid.
"""

from __future__ import annotations

import re

import torch

_IMAGE = re.compile(r"^(double_blocks\.\d+\.(img_attn\.(qkv|proj)|img_mlp\.[02])|img_in|final_layer\.linear)$")
_TEXT = re.compile(r"^(double_blocks\.\d+\.(txt_attn\.(qkv|proj)|txt_mlp\.[02])|txt_in)$")
_JOINT = re.compile(r"^single_blocks\.\d+\.linear[12]$")
_GLOBAL = re.compile(
    r"^(double_blocks\.\d+\.(img_mod|txt_mod)\.lin|single_blocks\.\d+\.modulation\.lin"
    r"|final_layer\.adaLN_modulation\.1|(time_in|vector_in|guidance_in)\.(in_layer|out_layer))$"
)


def layout_of(module_path: str) -> str | None:
    """Token layout of a FLUX module (path inside diffusion_model), or None for non-Linear targets.

    image [B, N_img, C]: image stream; text [B, T, C]: text stream; joint [B, T + N_img, C]: single blocks;
    global [B, C]: modulation and embeddings (acts on whole-image vectors, never masked).
    """
    for layout, pattern in (("image", _IMAGE), ("text", _TEXT), ("joint", _JOINT), ("global", _GLOBAL)):
        if pattern.match(module_path):
            return layout
    return None


def is_flux(diffusion_model) -> bool:
    return hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks")


def token_grid(latent: torch.Tensor) -> tuple[int, int]:
    """FLUX's image-token grid for a latent [B, 16, h, w]: 2x2 patches after padding to even sizes."""
    h, w = latent.shape[-2:]
    return (h + 1) // 2, (w + 1) // 2


def blocks(diffusion_model) -> list[tuple[str, int, torch.nn.Module]]:
    """Every attention block in call order, as ("double" | "single", index, module)."""
    out = [("double", i, b) for i, b in enumerate(diffusion_model.double_blocks)]
    out += [("single", i, b) for i, b in enumerate(diffusion_model.single_blocks)]
    return out


def biased_attention(apply_rope, q, k, v, pe, bias: torch.Tensor) -> torch.Tensor:
    """Forge's attention (RoPE, then SDPA) with an additive pre-softmax bias.

    q, k, v [B, H, L, D]; bias [B, L, L] (broadcast over heads); returns [B, L, H * D] like Forge's.
    """
    q, k = apply_rope(q, k, pe)
    mask = bias.to(dtype=q.dtype, device=q.device).unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)
