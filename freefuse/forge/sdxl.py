"""SDXL-family UNets in Forge (backend/nn/unet.py): layers, the capture transformer, cross-attention bias.

Image tokens live at three resolutions (latent, /2, /4); each ``SpatialTransformer`` flattens its
``[B, C, h, w]`` input row-major, so a forward pre-hook on it tells every Linear inside which grid it works
on. The capture point is ``output_blocks.0.1.transformer_blocks.K`` (diffusers
``up_blocks.0.attentions.0.transformer_blocks.K``): q/k of its cross attention (attn2) and attn1's output.
The bias goes through one swap of the module-level ``backend.nn.unet.attention_function``, which
``CrossAttention.forward`` looks up at call time; an attn2 replace patch (IPAdapter) is left alone.
"""

from __future__ import annotations

import re

import torch

from freefuse import call_weights as cw
from freefuse.forge import hooks
from freefuse.forge.loras import resolve_module
from freefuse.masks import SDXL, Capture

_T = r"(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
_IMAGE = re.compile(
    rf"^{_T}\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)"
    r"|attn2\.(to_q|to_out\.0)|ff\.net\.(0\.proj|2)))$"
)
_TEXT = re.compile(rf"^{_T}\.transformer_blocks\.\d+\.attn2\.(to_k|to_v)$")
_CONV = re.compile(
    r"^((input_blocks|output_blocks)\.\d+\.0|middle_block\.[02])\.(in_layers\.2|out_layers\.3|skip_connection)$"
    r"|^input_blocks\.0\.0$|^out\.2$|^input_blocks\.\d+\.0\.op$|^output_blocks\.\d+\.\d\.conv$"
)
_GLOBAL = re.compile(r"(\.emb_layers\.1|^time_embed\.[02]|^label_emb\.0\.[02])$")


def layout_of(module_path: str) -> str | None:
    """Token layout of an SDXL UNet module (path inside diffusion_model), or None.

    image [B, h*w, C] (attn1, attn2 q/out, ff, proj_in/out); text [B, T, C] (attn2 k/v: never spatially
    masked); conv [B, C, h, w] (ResBlock convs incl. LoCon, conv in/out, down/up-samplers); global [B, C].
    """
    for layout, pattern in (("image", _IMAGE), ("text", _TEXT), ("conv", _CONV), ("global", _GLOBAL)):
        if pattern.search(module_path):
            return layout
    return None


def latent_grid(latent: torch.Tensor) -> tuple[int, int]:
    """A UNet call's own grid is the latent's; each level's grid comes from its SpatialTransformer."""
    return tuple(latent.shape[-2:])


def transformer_blocks(diffusion_model) -> list[tuple[str, torch.nn.Module]]:
    """Every SpatialTransformer of the UNet with its path, e.g. ("output_blocks.0.1", module)."""
    return [
        (name.removeprefix("diffusion_model."), module)
        for name, module in diffusion_model.named_modules()
        if hasattr(module, "transformer_blocks") and hasattr(module, "proj_in")
    ]


class SdxlFamily:
    """Everything FreeFuse needs to know about an SDXL-layout UNet in Forge."""

    name = "sdxl"
    traits = SDXL
    layout_of = staticmethod(layout_of)

    @staticmethod
    def matches(diffusion_model) -> bool:
        # SDXL's UNet has the pooled-text "label_emb"; SD 1.x/2.x UNets do not (not supported, said clearly)
        return type(diffusion_model).__name__ == "IntegratedUNet2DConditionModel" and hasattr(
            diffusion_model, "label_emb"
        )

    def prepare(self, settings, diffusion_model) -> str | None:
        """Read the capture transformer and the bias choice; a user-facing reason they cannot run here, or None."""
        capture = resolve_module(diffusion_model, "output_blocks.0.1")
        blocks = getattr(capture, "transformer_blocks", None)
        if blocks is None:
            return "this UNet has no transformer at output_blocks.0 (not an SDXL layout)"
        if settings.capture_block >= len(blocks):
            return (
                f"capture_block {settings.capture_block} does not exist (output_blocks.0 has transformer blocks "
                f"0-{len(blocks) - 1})"
            )
        if settings.bias_blocks not in ("all", "none"):
            return f"bias_blocks {settings.bias_blocks!r} names FLUX blocks; on SDXL use 'all' or 'none'"
        self._bias_on = settings.bias_blocks == "all"
        return None

    def install(self, session, diffusion_model) -> None:
        import backend.nn.unet as unet_module

        hooks.install_call_hooks(session, diffusion_model, latent_grid)
        for _, transformer in transformer_blocks(diffusion_model):
            session.add_handle(transformer.register_forward_pre_hook(_level_hook(session)))
            for block in transformer.transformer_blocks:
                session.add_handle(block.attn2.register_forward_pre_hook(_cross_hook(session, True)))
                session.add_handle(block.attn2.register_forward_hook(_cross_hook(session, False)))
        target = diffusion_model.output_blocks[0][1].transformer_blocks[session.settings.capture_block]
        _install_capture(session, target)
        original = unet_module.attention_function
        unet_module.attention_function = _attention(session, self, original)
        session.add_restore(lambda: setattr(unet_module, "attention_function", original))

    def bias_grid(self, session, grid=None) -> tuple[int, int] | None:
        """The grid of the transformer running now when its cross attention gets the bias, else None."""
        return grid if self._bias_on else None


def biased_cross_attention(session, q, k, v, heads: int, grid) -> torch.Tensor:
    """Forge's cross attention (q [B, N, H*d], k/v [B, T, H*d]) with the session's image->text bias."""
    b, n, inner = q.shape
    d = inner // heads

    def split(t):
        return t.view(b, -1, heads, d).transpose(1, 2)  # [B, H, L, d]

    out = session.bias.attend("cross", grid, split(q), split(k), split(v))  # [B, H, N, d]
    return out.transpose(1, 2).reshape(b, n, inner)


# ---------------------------------------------------------------------- hooks (closures over the session)
def _level_hook(session):
    def hook(module, args):
        if session.live():
            session.level_grid = tuple(args[0].shape[-2:])  # SpatialTransformer input [B, C, h, w]
        return None

    return hook


def _cross_hook(session, entering: bool):
    def pre_hook(module, args):
        if session.live():
            session.in_cross = True
        return None

    def post_hook(module, args, output):
        session.in_cross = False
        return None

    return pre_hook if entering else post_hook


def _attention(session, family: SdxlFamily, original):
    def attention_function(q, k, v, heads, mask=None, *args, **kwargs):
        if session.live() and session.call is not None and session.in_cross and mask is None:
            grid = session.bias.grid(family, grid=session.level_grid)
            if grid is not None and grid[0] * grid[1] == q.shape[1] and session.call.shape.n_txt == k.shape[1]:
                return biased_cross_attention(session, q, k, v, heads, grid)
        return original(q, k, v, heads, mask, *args, **kwargs)

    return attention_function


def _install_capture(session, block) -> None:
    """Record attn1 q/k/out and attn2 q/k of the capture block while a capture is armed; maps at its end."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            if session.live() and session.call is not None and session.call.capture:
                seen[name] = output
            return None

        return hook

    for name, module in (
        ("q_self", block.attn1.to_q),
        ("k_self", block.attn1.to_k),
        ("o_self", block.attn1.to_out[0]),
        ("q_cross", block.attn2.to_q),
        ("k_cross", block.attn2.to_k),
    ):
        session.add_handle(module.register_forward_hook(keep(name)))

    def done(module, args, output):
        if session.live() and session.call is not None and session.call.capture and len(seen) == 5:
            _capture(session, block.attn2.heads, dict(seen))
        seen.clear()
        return None

    session.add_handle(block.register_forward_hook(done))


def _capture(session, heads: int, seen: dict) -> None:
    call = session.call
    rows = cw.cond_rows(call.shape)
    grid = session.level_grid

    def split(t):  # [B, L, H*d] -> [B, H, L, d], cond rows, float32
        t = t[rows].float()
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    session.on_capture(
        Capture(
            q_img=split(seen["q_self"]),
            k_img=split(seen["k_self"]),
            k_txt=split(seen["k_cross"]),
            o_img=seen["o_self"][rows].float(),
            grid_hw=grid,
            q_cross=split(seen["q_cross"]),
        )
    )
