"""FLUX in Forge (backend/nn/flux.py): which layer holds which tokens, where attention is reached, the capture.

Forge's FLUX has no patch points and ``transformer_options`` never reaches a block, so FreeFuse uses
PyTorch hooks on the shared modules plus one swap of the module-level ``backend.nn.flux.attention`` function,
which every double and single block looks up at call time. The joint sequence is ``[text | image]``; image
tokens are row-major over an ``(H/16) x (W/16)`` grid.
"""

from __future__ import annotations

import re

import torch

from freefuse import call_weights as cw
from freefuse.bias import bias_blocks
from freefuse.forge import hooks
from freefuse.masks import FLUX, Capture

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


def token_grid(latent: torch.Tensor) -> tuple[int, int]:
    """FLUX's image-token grid for a latent [B, 16, h, w]: 2x2 patches after padding to even sizes."""
    h, w = latent.shape[-2:]
    return (h + 1) // 2, (w + 1) // 2


class FluxFamily:
    """Everything FreeFuse needs to know about FLUX in Forge, behind the interface every family has."""

    name = "flux"
    traits = FLUX
    layout_of = staticmethod(layout_of)

    @staticmethod
    def matches(diffusion_model) -> bool:
        # Forge's FLUX class only: Chroma has the same blocks but binds `attention` by name, out of reach
        return type(diffusion_model).__name__ == "IntegratedFluxTransformer2DModel"

    def prepare(self, settings, diffusion_model) -> str | None:
        """Read the block layout for these settings; a user-facing reason they cannot run here, or None."""
        n_double = len(diffusion_model.double_blocks)
        if settings.capture_block >= n_double:
            return (
                f"capture_block {settings.capture_block} does not exist (this model has double blocks 0-{n_double - 1})"
            )
        self._bias_double, self._bias_single = bias_blocks(
            settings.bias_blocks, n_double, len(diffusion_model.single_blocks)
        )
        return None

    def install(self, session, diffusion_model) -> None:
        import backend.nn.flux as flux_module

        hooks.install_call_hooks(session, diffusion_model, token_grid)
        blocks = [("double", i, b) for i, b in enumerate(diffusion_model.double_blocks)]
        blocks += [("single", i, b) for i, b in enumerate(diffusion_model.single_blocks)]
        for kind, index, block in blocks:
            session.add_handle(block.register_forward_pre_hook(_block_hook(session, kind, index)))
        original = flux_module.attention
        flux_module.attention = _attention(session, self, original, flux_module.apply_rope)
        session.add_restore(lambda: setattr(flux_module, "attention", original))

    def bias_grid(self, session) -> tuple[int, int] | None:
        """The call's token grid when the block running now gets the joint-attention bias, else None."""
        kind, index = session.current_block or ("", -1)
        if index not in (self._bias_double if kind == "double" else self._bias_single):
            return None
        return session.call.grid_hw


def biased_attention(session, apply_rope, q, k, v, pe, grid) -> torch.Tensor:
    """Forge's attention (RoPE, then SDPA) with the session's joint bias.

    q, k, v [B, H, L, D] with L = T + N; returns [B, L, H * D] like Forge's ``attention``.
    """
    q, k = apply_rope(q, k, pe)
    out = session.bias.attend("joint", grid, q, k, v)  # [B, H, L, D]
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


# ---------------------------------------------------------------------- hooks (closures over the session)
def _block_hook(session, kind: str, index: int):
    def hook(module, args):
        if session.live():
            session.current_block = (kind, index)
        return None

    return hook


def _attention(session, family: FluxFamily, original, apply_rope):
    def attention(q, k, v, pe):
        if not session.live() or session.call is None:
            return original(q, k, v, pe)
        if session.call.capture and session.current_block == ("double", session.settings.capture_block):
            out = original(q, k, v, pe)
            _capture(session, apply_rope, q, k, pe, out)
            return out
        grid = session.bias.grid(family)
        if grid is None:
            return original(q, k, v, pe)
        return biased_attention(session, apply_rope, q, k, v, pe, grid)

    return attention


def _capture(session, apply_rope, q, k, pe, out) -> None:
    """q, k [B, H, T + N, D] after QK-norm (RoPE applied here); out [B, T + N, H * D]; cond rows only."""
    call = session.call
    rows = cw.cond_rows(call.shape)
    n_txt = call.shape.n_txt
    q_r, k_r = apply_rope(q[rows], k[rows], pe[rows] if pe.shape[0] > 1 else pe)
    q_r, k_r = q_r.float(), k_r.float()
    session.on_capture(
        Capture(
            q_img=q_r[:, :, n_txt:],
            k_img=k_r[:, :, n_txt:],
            k_txt=k_r[:, :, :n_txt],
            q_txt=q_r[:, :, :n_txt],
            o_img=out[rows, n_txt:].float(),
            grid_hw=call.grid_hw,
        )
    )
