"""SDXL half of the stand-in harness: the tiny SDXL-layout UNet's config, scheduler, LoRA layers and conds.

Conventions shared with the real tier (tests/forge/harness_sdxl.py), so both draw the same numbers:
- config: IntegratedUNet2DConditionModel keyword arguments as huggingface_guess gives them for SDXL
  (2 ResBlocks per level, linear proj_in/out, num_classes "sequential", 4 latent channels), scaled down;
- predictor: what KModel builds from SDXL's bundled EulerDiscreteScheduler config (EPS, scaled_linear
  betas 0.00085 .. 0.012 over 1000 steps);
- LoRA layers in module order (named_modules): "all" = every Linear of the SpatialTransformers
  (proj_in/out, attn1/attn2 to_q/k/v/to_out.0, ff.net.0.proj, ff.net.2) and the ResBlock convs
  in_layers.2 / out_layers.3 as LoCon; "linear" = those Linears; "attn" = the attn1/attn2 Linears;
- conds: crossattn [B, 77 * chunks, context_dim] then vector [B, adm_in_channels], both N(0, 1).

The real SDXL this scales down: model_channels 320, transformer_depth (0,0,2,2,10,10), middle 10, output
(0,0,0,2,2,2,10,10,10), 64 channels per head, context 2048, adm 2816. With 3 levels the blocks are
input_blocks.0 conv; .1-.2 level 0; .3 Downsample; .4-.5 level 1 (transformer at .1); .6 Downsample;
.7-.8 level 2; middle_block.0/.1/.2; output_blocks.0-.2 level 2 (.2.2 Upsample), .3-.5 level 1
(.5.2 Upsample), .6-.8 level 0.
"""

import re
from types import SimpleNamespace

import torch

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_LATENT_CHANNELS = 4
CLIP_CHUNK_TOKENS = 77  # BOS + 75 tokens + EOS per prompt chunk
NORM_GROUPS = 32  # every GroupNorm of the UNet has 32 groups

# diffusers' EulerDiscreteScheduler config bundled with Forge for SDXL (only the fields Forge reads)
SDXL_SCHEDULER = SimpleNamespace(
    config=SimpleNamespace(
        prediction_type="epsilon",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
    )
)

_RESBLOCK_CONVS = (".in_layers.2", ".out_layers.3")
_ATTN_LINEAR = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def sdxl_unet_config(
    *,
    model_channels: int,
    transformer_depth: tuple,
    transformer_depth_middle: int,
    transformer_depth_output: tuple,
    channel_mult: tuple,
    num_head_channels: int,
    context_dim: int,
    adm_in_channels: int,
) -> dict:
    """Keyword arguments of IntegratedUNet2DConditionModel for an SDXL-shaped UNet."""
    levels = len(channel_mult)
    if len(transformer_depth) != 2 * levels or len(transformer_depth_output) != 3 * levels:
        raise ValueError(f"need {2 * levels} input and {3 * levels} output transformer depths for {levels} levels")
    for mult in channel_mult:
        channels = model_channels * mult
        if channels % NORM_GROUPS or channels % num_head_channels:
            raise ValueError(f"{channels} channels must divide by {NORM_GROUPS} and by {num_head_channels}")
    return dict(
        in_channels=SDXL_LATENT_CHANNELS,
        out_channels=SDXL_LATENT_CHANNELS,
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


def is_unet(diffusion_model) -> bool:
    """True for the SD/SDXL UNet (input/middle/output blocks), False for FLUX."""
    return hasattr(diffusion_model, "input_blocks")


def sdxl_lora_layers(diffusion_model, targets: str) -> list:
    """(kohya key prefix, weight shape) per targeted layer, in module order."""
    if targets not in ("all", "linear", "attn"):
        raise ValueError(f"targets for SDXL must be 'all', 'linear' or 'attn', not {targets!r}")
    layers = []
    for name, module in diffusion_model.named_modules():
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
            layers.append(("lora_unet_" + name.replace(".", "_"), weight.shape))
    return layers


def sdxl_conds(diffusion_model, batch: int, n_txt: int, gen: torch.Generator) -> dict:
    """SDXL conds as diffusion_engine/sdxl.py builds them: crossattn = CLIP-L | CLIP-G hidden states,
    77 tokens per prompt chunk; vector = pooled CLIP-G + size embeddings (here random)."""
    if n_txt <= 0 or n_txt % CLIP_CHUNK_TOKENS:
        raise ValueError(f"SDXL crossattn length must be a positive multiple of {CLIP_CHUNK_TOKENS}, not {n_txt}")
    config = diffusion_model.config
    return dict(
        crossattn=torch.randn(batch, n_txt, config["context_dim"], generator=gen),  # [B, 77k, ctx]
        vector=torch.randn(batch, config["adm_in_channels"], generator=gen),  # [B, adm]
    )
