"""FLUX half of the real-Forge harness: the tiny model's config, how it is wrapped (diffusion_engine/flux.py),
which layers its LoRA files name, and FLUX-style conds."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.forge.harness_common import PromptConds, build_like_loader

LATENT_CHANNELS = 16
DISTILLED_GUIDANCE = 3.5
DEV_REPO = "black-forest-labs/FLUX.1-dev"
SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"


def rope_axes_dim(head_dim: int) -> list[int]:
    """Even RoPE axis sizes summing to `head_dim`, split like FLUX's [16, 56, 56] of 128."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head dim {head_dim} must be even and at least 6")
    first = max(2, (head_dim // 8) // 2 * 2)
    second = ((head_dim - first) // 2) // 2 * 2
    return [first, second, head_dim - first - second]


def flux_config(
    *, n_double: int, n_single: int, hidden: int, heads: int, context_dim: int, vec_dim: int, guidance: bool
) -> dict:
    """The keyword arguments of IntegratedFluxTransformer2DModel (what huggingface_guess would give)."""
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    return dict(
        in_channels=LATENT_CHANNELS,  # the model multiplies by 4 (2x2 patches): img_in takes 64
        vec_in_dim=vec_dim,
        context_in_dim=context_dim,
        hidden_size=hidden,
        mlp_ratio=4.0,
        num_heads=heads,
        depth=n_double,
        depth_single_blocks=n_single,
        axes_dim=rope_axes_dim(hidden // heads),
        theta=10000,
        qkv_bias=True,
        guidance_embed=guidance,
    )


def build_flux_unet(forge, config: dict, seed: int, dtype: torch.dtype):
    """The model as backend/loader.py builds it, wrapped as diffusion_engine/flux.py does (a UnetPatcher
    around a KModel with the dev or schnell PredictionFlux)."""
    dm = build_like_loader(forge, lambda: forge.flux.IntegratedFluxTransformer2DModel(**config), config, seed, dtype)
    if config["guidance_embed"]:  # diffusion_engine/flux.py: dev gets the resolution-shift predictor, schnell mu=1
        repo = DEV_REPO
        predictor = forge.k_prediction.PredictionFlux(
            seq_len=4096, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15
        )
    else:
        repo = SCHNELL_REPO
        predictor = forge.k_prediction.PredictionFlux(mu=1.0)
    estimated_config = SimpleNamespace(huggingface_repo=repo, unet_config=config)
    return forge.unet.UnetPatcher.from_model(
        model=dm, diffusers_scheduler=None, k_predictor=predictor, config=estimated_config
    )


# Diffusers/ai-toolkit FLUX LoRA names -> (Forge module inside the block, rows of its weight as
# (start, size) in units of `hidden` or `mlp`, or None for the whole weight).
_DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", (0, 1)),
    "attn.to_k": ("img_attn.qkv", (1, 1)),
    "attn.to_v": ("img_attn.qkv", (2, 1)),
    "attn.add_q_proj": ("txt_attn.qkv", (0, 1)),
    "attn.add_k_proj": ("txt_attn.qkv", (1, 1)),
    "attn.add_v_proj": ("txt_attn.qkv", (2, 1)),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
_DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", (0, 1)),
    "attn.to_k": ("linear1", (1, 1)),
    "attn.to_v": ("linear1", (2, 1)),
    "proj_mlp": ("linear1", "mlp"),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_DIFFUSERS_ATTN = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj"}
_DIFFUSERS_ATTN |= {"attn.add_v_proj", "attn.to_out.0", "attn.to_add_out"}
_KOHYA_ATTN_SUFFIXES = ("_attn.qkv", "_attn.proj", ".linear1")


def flux_lora_targets(forge, dm, fmt: str, targets: str) -> dict[str, tuple[int, int]]:
    """{LoRA key prefix: (out, in) of the delta} in module order. kohya: whole double/single-block
    Linears; diffusers: `transformer.<diffusers name>`, q/k/v and proj_mlp as row slices of the fused
    qkv / linear1. targets "all" or "attn" (attention only)."""
    if targets not in ("all", "attn"):
        raise ValueError(f"targets for FLUX must be 'all' or 'attn', not {targets!r}")
    hidden = dm.hidden_size
    out: dict[str, tuple[int, int]] = {}
    if fmt == "kohya":
        for mod_name, module in dm.named_modules():
            if not mod_name.startswith(("double_blocks.", "single_blocks.")):
                continue
            if getattr(module, "weight", None) is None or module.weight.ndim != 2:
                continue
            if targets == "attn" and not mod_name.endswith(_KOHYA_ATTN_SUFFIXES):
                continue
            n_out, n_in = module.weight.shape
            out["lora_unet_" + mod_name.replace(".", "_")] = (n_out, n_in)
        return out

    for kind, table in (
        ("transformer_blocks", _DIFFUSERS_DOUBLE),
        ("single_transformer_blocks", _DIFFUSERS_SINGLE),
    ):
        blocks = dm.double_blocks if kind == "transformer_blocks" else dm.single_blocks
        for i, block in enumerate(blocks):
            for diff_name, (forge_name, rows) in table.items():
                if targets == "attn" and diff_name not in _DIFFUSERS_ATTN:
                    continue
                n_out, n_in = forge.utils.get_attr(block, forge_name).weight.shape
                if rows == "mlp":
                    n_out = block.mlp_hidden_dim
                elif rows is not None:
                    n_out = rows[1] * hidden
                out[f"transformer.{kind}.{i}.{diff_name}"] = (n_out, n_in)
    return out


def flux_conds(dm, batch: int, n_txt: int, gen: torch.Generator) -> PromptConds:
    """FLUX conds like diffusion_engine/flux.py get_learned_conditioning: T5 crossattn, CLIP pooled
    vector and (dev only) the distilled guidance per image."""
    conds = PromptConds(
        crossattn=torch.randn(batch, n_txt, dm.txt_in.in_features, generator=gen),  # [B, n_txt, ctx]
        vector=torch.randn(batch, dm.vector_in.in_layer.in_features, generator=gen),  # [B, vec]
    )
    if dm.guidance_embed:
        conds["guidance"] = torch.full((batch,), DISTILLED_GUIDANCE)
    return conds
