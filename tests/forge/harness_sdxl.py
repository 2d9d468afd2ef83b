"""SDXL half of the real-Forge harness: a tiny SDXL-layout UNet from backend/nn/unet.py, wrapped as
diffusion_engine/sdxl.py wraps it, the layers its kohya LoRA files name, and SDXL-style conds.

Layout (same module names as real SDXL, which has model_channels 320, transformer_depth (0,0,2,2,10,10),
middle 10, output (0,0,0,2,2,2,10,10,10), 64 channels per head, context 2048, adm 2816):
input_blocks.0 conv; level 0: input_blocks.1-2 (ResBlocks only), .3 Downsample; level 1: .4-5 (ResBlock +
SpatialTransformer at index 1), .6 Downsample; level 2: .7-8; middle_block.0/.1 (transformer)/.2;
output_blocks.0-2 level 2 (transformer at .1, .2.2 Upsample), .3-5 level 1 (.5.2 Upsample), .6-8 level 0.
"""

from __future__ import annotations

import importlib
import json
import re
from types import SimpleNamespace

import torch

from tests.forge.harness_common import PromptConds, build_like_loader

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
LATENT_CHANNELS = 4
CLIP_CHUNK_TOKENS = 77  # BOS + 75 + EOS per chunk (backend/text_processing/classic_engine.py)
_NORM_GROUPS = 32  # every GroupNorm of backend/nn/unet.py has 32 groups

_RESBLOCK_CONVS = (".in_layers.2", ".out_layers.3")
_ATTN_LINEAR = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def sdxl_unet_config(
    *,
    model_channels: int,
    transformer_depth: tuple[int, ...],
    transformer_depth_middle: int,
    transformer_depth_output: tuple[int, ...],
    channel_mult: tuple[int, ...],
    num_head_channels: int,
    context_dim: int,
    adm_in_channels: int,
) -> dict:
    """Keyword arguments of IntegratedUNet2DConditionModel in the shape huggingface_guess gives for SDXL
    (2 ResBlocks per level, linear proj_in/out, 'sequential' ADM, 4 latent channels), scaled down."""
    levels = len(channel_mult)
    if len(transformer_depth) != 2 * levels or len(transformer_depth_output) != 3 * levels:
        raise ValueError(f"need {2 * levels} input and {3 * levels} output transformer depths for {levels} levels")
    for mult in channel_mult:
        channels = model_channels * mult
        if channels % _NORM_GROUPS or channels % num_head_channels:
            raise ValueError(f"{channels} channels must divide by {_NORM_GROUPS} and by {num_head_channels}")
    return dict(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        model_channels=model_channels,
        num_res_blocks=[2] * levels,
        channel_mult=list(channel_mult),
        transformer_depth=list(transformer_depth),
        transformer_depth_middle=transformer_depth_middle,
        transformer_depth_output=list(transformer_depth_output),
        num_head_channels=num_head_channels,
        num_heads=-1,
        context_dim=context_dim,
        adm_in_channels=adm_in_channels,
        num_classes="sequential",
        use_linear_in_transformer=True,
        use_spatial_transformer=True,
        use_checkpoint=False,
        dims=2,
    )


def bundled_scheduler(forge):
    """The SDXL scheduler as backend/loader.py loads it: the diffusers class named in the bundled
    model_index.json, `from_pretrained(<repo>/scheduler)`; SDXL is EPS, i.e. prediction_type 'epsilon'."""
    repo_dir = forge.root / "backend" / "huggingface" / SDXL_REPO
    lib_name, cls_name = json.loads((repo_dir / "model_index.json").read_text())["scheduler"]
    scheduler = getattr(importlib.import_module(lib_name), cls_name).from_pretrained(str(repo_dir / "scheduler"))
    if scheduler.config.prediction_type != "epsilon":
        raise RuntimeError(f"bundled SDXL scheduler is {scheduler.config.prediction_type}, expected epsilon")
    return scheduler


def build_sdxl_unet(forge, config: dict, seed: int, dtype: torch.dtype):
    """The UNet as backend/loader.py builds it (`from_config` under Forge's operations, then
    load_state_dict), wrapped as diffusion_engine/sdxl.py does: UnetPatcher.from_model with the diffusers
    scheduler, so KModel picks its predictor with k_prediction_from_diffusers_scheduler (EPS Prediction)."""
    model_cls = forge.unet_nn.IntegratedUNet2DConditionModel
    dm = build_like_loader(forge, lambda: model_cls.from_config(config), config, seed, dtype)
    estimated_config = SimpleNamespace(
        huggingface_repo=SDXL_REPO, unet_config=config, model_type=SimpleNamespace(name="EPS")
    )
    return forge.unet.UnetPatcher.from_model(
        model=dm, diffusers_scheduler=bundled_scheduler(forge), config=estimated_config
    )


def sdxl_lora_targets(dm, targets: str) -> dict[str, torch.Size]:
    """{kohya LoRA key prefix: weight shape} in module order. "all": every Linear of the
    SpatialTransformers (proj_in/out, attn1/attn2 to_q/k/v/out.0, ff.net.0.proj, ff.net.2) and the ResBlock
    convs in_layers.2 / out_layers.3 (LoCon); "linear": the Linears only; "attn": attn1/attn2 Linears only."""
    if targets not in ("all", "linear", "attn"):
        raise ValueError(f"targets for SDXL must be 'all', 'linear' or 'attn', not {targets!r}")
    out: dict[str, torch.Size] = {}
    for name, module in dm.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        in_transformer = ".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out"))
        is_linear = weight.ndim == 2 and in_transformer
        is_conv = weight.ndim == 4 and name.endswith(_RESBLOCK_CONVS)
        wanted = {
            "all": is_linear or is_conv,
            "linear": is_linear,
            "attn": is_linear and _ATTN_LINEAR.search(name) is not None,
        }[targets]
        if wanted:
            out["lora_unet_" + name.replace(".", "_")] = weight.shape
    return out


def sdxl_conds(dm, batch: int, n_txt: int, gen: torch.Generator) -> PromptConds:
    """SDXL conds like diffusion_engine/sdxl.py get_learned_conditioning: crossattn = CLIP-L and CLIP-G
    hidden states side by side, `n_txt` = 77 per prompt chunk; vector = pooled CLIP-G + size embeddings."""
    if n_txt <= 0 or n_txt % CLIP_CHUNK_TOKENS:
        raise ValueError(f"SDXL crossattn length must be a positive multiple of {CLIP_CHUNK_TOKENS}, not {n_txt}")
    return PromptConds(
        crossattn=torch.randn(batch, n_txt, dm.config["context_dim"], generator=gen),  # [B, 77k, ctx]
        vector=torch.randn(batch, dm.config["adm_in_channels"], generator=gen),  # [B, adm]
    )
