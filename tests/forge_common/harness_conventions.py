"""Conventions both test harnesses follow, so that the stand-in (tests/forge_standin) and the real-Forge
tier (tests/forge) draw the same numbers and agree bit for bit.

- Weights: drawn in state-dict order from one generator seeded with `seed`: Linear/Conv weights
  N(0, std^2) with std = clamp(0.5/sqrt(fan_in), 0.02, 0.1), fan_in = prod(shape[1:]); biases
  N(0, 0.02^2); norm scales (RMSNorm `.scale`, GroupNorm/LayerNorm 1-D `.weight`) 1 + N(0, 0.1^2).
- Tiny FLUX: IntegratedFluxTransformer2DModel with in_channels 16 (x 2 x 2 patch = 64 features),
  `rope_axes_dim(head_dim)`, theta 10000, qkv_bias True, mlp_ratio 4; the predictor as Forge's
  diffusion_engine/flux.py picks it: dev (guidance) the resolution-shift PredictionFlux, schnell mu=1.
- Tiny SDXL: IntegratedUNet2DConditionModel keyword arguments as huggingface_guess gives them for SDXL
  (2 ResBlocks per level, linear proj_in/out, num_classes "sequential", 4 latent channels), scaled down.
  Real SDXL has model_channels 320, transformer_depth (0,0,2,2,10,10), middle 10, output
  (0,0,0,2,2,2,10,10,10), 64 channels per head, context 2048, adm 2816. With 3 levels the blocks are
  input_blocks.0 conv; .1-.2 level 0; .3 Downsample; .4-.5 level 1 (transformer at .1); .6 Downsample;
  .7-.8 level 2; middle_block.0/.1/.2; output_blocks.0-.2 level 2 (.2.2 Upsample), .3-.5 level 1
  (.5.2 Upsample), .6-.8 level 0.
- LoRAs: per targeted layer in module order, down then up from one generator: down [r, in(, kh, kw)]
  ~ N(0, scale^2/fan_in), up [out, r(, 1, 1)] ~ N(0, scale^2/rank); kohya files carry alpha = rank / 2,
  diffusers files (FLUX only) no alpha (factor 1). Added to a patcher as networks.py does.
- Sampling: noise [B, C_latent, H/8, W/8], then the cond (crossattn, vector ~ N(0, 1); guidance 3.5 per
  row for FLUX dev), then an uncond only when cfg != 1 (None otherwise, as in Forge's txt2img), all from
  one generator seeded with `seed`; sigmas from Forge's "Simple" scheduler; Euler steps.

Nothing here imports Forge's `backend` (this module imports in CI without Forge); what must call a
backend gets the backend module or object as an argument.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

FLUX_LATENT_CHANNELS = 16
DISTILLED_GUIDANCE = 3.5
DEV_REPO = "black-forest-labs/FLUX.1-dev"
SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_LATENT_CHANNELS = 4
CLIP_CHUNK_TOKENS = 77  # BOS + 75 tokens + EOS per prompt chunk (backend/text_processing/classic_engine.py)
NORM_GROUPS = 32  # every GroupNorm of backend/nn/unet.py has 32 groups
LATENT_CHANNELS = {"flux": FLUX_LATENT_CHANNELS, "sdxl": SDXL_LATENT_CHANNELS}
DEFAULT_N_TXT = {"flux": 8, "sdxl": CLIP_CHUNK_TOKENS}
MAX_UNMATCHED_KEYS = 12  # networks.py: more unmatched or skipped LoRA keys than this and the LoRA is not applied


@dataclass
class LoraFile:
    """A LoRA 'on disk': Forge keys its patches by `filename`; `state_dict` is what the file holds."""

    filename: str
    name: str
    state_dict: dict[str, torch.Tensor] = field(repr=False)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: on tensors this small, thread hand-offs cost ~10x the maths. Benchmarks at full
    size set FREEFUSE_HARNESS_THREADS to use more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FREEFUSE_HARNESS_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- weights


def weight_std(fan_in: int) -> float:
    """Std of a random weight with `fan_in` inputs (in_features, or in_channels * kernel area)."""
    return min(0.1, max(0.02, 0.5 / math.sqrt(fan_in)))


def fill_random_(key: str, param: torch.Tensor, gen: torch.Generator) -> None:
    """Draw one parameter in place on its own device, with random_weights' distribution for ``key``."""
    param.normal_(generator=gen)
    if key.endswith(".scale") or (key.endswith(".weight") and param.ndim == 1):  # norm scales
        param.mul_(0.1).add_(1.0)
    elif key.endswith(".bias"):
        param.mul_(0.02)
    else:
        param.mul_(weight_std(math.prod(param.shape[1:])))


def random_weights(shapes: dict[str, torch.Size], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded weights for parameters `shapes` (state-dict order), drawn as the module docstring says."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith(".scale") or (key.endswith(".weight") and len(shape) == 1):  # norm scales
            value = 1.0 + 0.1 * noise
        elif key.endswith(".bias"):
            value = 0.02 * noise
        else:
            value = weight_std(math.prod(shape[1:])) * noise
        weights[key] = value.to(dtype)
    return weights


# ---------------------------------------------------------------------------------------------- configs


def rope_axes_dim(head_dim: int) -> list[int]:
    """Even RoPE axis sizes summing to `head_dim`, split like FLUX's [16, 56, 56] of 128."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head dim {head_dim} must be even and at least 6")
    first = max(2, 2 * (head_dim // 16))
    second = 2 * ((head_dim - first) // 4)
    return [first, second, head_dim - first - second]


# The real models' widths, for full-size benchmarks (make_flux_unet / make_sdxl_unet keyword arguments)
FLUX1_WIDTHS = dict(hidden=3072, heads=24, context_dim=4096, vec_dim=768)  # FLUX.1 (19 double / 38 single)
SDXL_WIDTHS = dict(
    model_channels=320, channel_mult=(1, 2, 4), num_head_channels=64, context_dim=2048, adm_in_channels=2816
)
SDXL_DEPTHS = dict(  # SDXL base 1.0's transformer depths
    transformer_depth=(0, 0, 2, 2, 10, 10),
    transformer_depth_middle=10,
    transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10),
)


def flux_config(
    *, n_double: int, n_single: int, hidden: int, heads: int, context_dim: int, vec_dim: int, guidance: bool
) -> dict:
    """The keyword arguments of IntegratedFluxTransformer2DModel (what huggingface_guess would give)."""
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    return dict(
        in_channels=FLUX_LATENT_CHANNELS,  # the model multiplies by 4 (2x2 patches): img_in takes 64
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


def flux_predictor(guidance: bool) -> tuple[str, dict]:
    """(huggingface repo, PredictionFlux keyword arguments) as diffusion_engine/flux.py picks them: dev
    (with guidance) gets the resolution-shift predictor, schnell mu=1."""
    if guidance:
        return DEV_REPO, dict(seq_len=4096, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return SCHNELL_REPO, dict(mu=1.0)


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
    """Keyword arguments of IntegratedUNet2DConditionModel for an SDXL-shaped UNet (see module docstring)."""
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


def model_kind(diffusion_model) -> str:
    """'sdxl' for a UNet (input/middle/output blocks), 'flux' otherwise."""
    return "sdxl" if hasattr(diffusion_model, "input_blocks") else "flux"


# ---------------------------------------------------------------------------------------------- LoRAs

# diffusers/ai-toolkit FLUX names -> (module inside the block, rows of its weight the delta feeds:
# None = all, "h" = one hidden-sized q/k/v slice of the fused weight, "mlp" = the MLP slice of linear1)
_DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", "h"),
    "attn.to_k": ("img_attn.qkv", "h"),
    "attn.to_v": ("img_attn.qkv", "h"),
    "attn.add_q_proj": ("txt_attn.qkv", "h"),
    "attn.add_k_proj": ("txt_attn.qkv", "h"),
    "attn.add_v_proj": ("txt_attn.qkv", "h"),
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
    "attn.to_q": ("linear1", "h"),
    "attn.to_k": ("linear1", "h"),
    "attn.to_v": ("linear1", "h"),
    "proj_mlp": ("linear1", "mlp"),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_DIFFUSERS_ATTN = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"}
_DIFFUSERS_ATTN |= {"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"}
_KOHYA_FLUX_ATTN = ("_attn.qkv", "_attn.proj", ".linear1")
_RESBLOCK_CONVS = (".in_layers.2", ".out_layers.3")
_SDXL_ATTN_LINEAR = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def flux_lora_targets(dm, fmt: str, targets: str) -> dict[str, tuple[int, int]]:
    """{LoRA key prefix: (out, in) of the delta} in module order. kohya: whole double/single-block
    Linears; diffusers: `transformer.<diffusers name>`, q/k/v and proj_mlp as row slices of the fused
    qkv / linear1. targets "all" or "attn" (attention only)."""
    if targets not in ("all", "attn"):
        raise ValueError(f"targets for FLUX must be 'all' or 'attn', not {targets!r}")
    out: dict[str, tuple[int, int]] = {}
    if fmt == "kohya":
        for name, module in dm.named_modules():
            weight = getattr(module, "weight", None)
            if not name.startswith(("double_blocks.", "single_blocks.")) or weight is None or weight.ndim != 2:
                continue
            if targets == "attn" and not name.endswith(_KOHYA_FLUX_ATTN):
                continue
            out["lora_unet_" + name.replace(".", "_")] = tuple(weight.shape)
        return out
    hidden = dm.hidden_size
    for kind, blocks, table in (
        ("transformer_blocks", dm.double_blocks, _DIFFUSERS_DOUBLE),
        ("single_transformer_blocks", dm.single_blocks, _DIFFUSERS_SINGLE),
    ):
        for i, block in enumerate(blocks):
            for diffusers_name, (module_name, rows) in table.items():
                if targets == "attn" and diffusers_name not in _DIFFUSERS_ATTN:
                    continue
                n_out, n_in = block.get_submodule(module_name).weight.shape
                n_out = {None: n_out, "h": hidden, "mlp": n_out - 3 * hidden}[rows]  # linear1 = [q; k; v; mlp]
                out[f"transformer.{kind}.{i}.{diffusers_name}"] = (n_out, n_in)
    return out


def sdxl_lora_targets(dm, targets: str) -> dict[str, tuple[int, ...]]:
    """{kohya LoRA key prefix: weight shape} in module order. "all": every Linear of the
    SpatialTransformers (proj_in/out, attn1/attn2 to_q/k/v/out.0, ff.net.0.proj, ff.net.2) and the ResBlock
    convs in_layers.2 / out_layers.3 (LoCon); "linear": the Linears only; "attn": attn1/attn2 Linears only."""
    if targets not in ("all", "linear", "attn"):
        raise ValueError(f"targets for SDXL must be 'all', 'linear' or 'attn', not {targets!r}")
    out: dict[str, tuple[int, ...]] = {}
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
            "attn": is_linear and _SDXL_ATTN_LINEAR.search(name) is not None,
        }[targets]
        if wanted:
            out["lora_unet_" + name.replace(".", "_")] = tuple(weight.shape)
    return out


def random_lora_factors(
    weight_shape: tuple[int, ...], rank: int, scale: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for one layer, down first from `gen`. Linear [out, in]: down [r, in] ~ N(0, scale^2/in),
    up [out, r] ~ N(0, scale^2/r). Conv [out, in, kh, kw] (LoCon): down [r, in, kh, kw] with
    fan_in in*kh*kw, up [out, r, 1, 1]."""
    n_out, n_in, *kernel = weight_shape
    fan_in = n_in * math.prod(kernel)
    down = torch.randn(rank, n_in, *kernel, generator=gen) * (scale / math.sqrt(fan_in))
    up = torch.randn(n_out, rank, *[1] * len(kernel), generator=gen) * (scale / math.sqrt(rank))
    return down, up


def make_lora_file(dm, kind: str, *, name: str, rank: int, fmt: str, seed: int, targets: str, scale: float) -> LoraFile:
    """A random LoRA for diffusion model `dm` of `kind` ('flux' | 'sdxl'). kohya: `lora_unet_<module>`
    with lora_down/lora_up/alpha (alpha = rank/2); diffusers (FLUX only): `transformer.<diffusers name>`
    with lora_A/lora_B, no alpha. Targets: see flux_lora_targets / sdxl_lora_targets."""
    if fmt not in ("kohya", "diffusers"):
        raise ValueError(f"fmt must be 'kohya' or 'diffusers', not {fmt!r}")
    if kind == "sdxl":
        if fmt != "kohya":
            raise ValueError("SDXL LoRAs are made in kohya format only")
        shapes = sdxl_lora_targets(dm, targets)
    else:
        shapes = flux_lora_targets(dm, fmt, targets)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for prefix, shape in shapes.items():
        down, up = random_lora_factors(shape, rank, scale, gen)  # [r, in(, kh, kw)], [out, r(, 1, 1)]
        if fmt == "kohya":
            state[f"{prefix}.lora_down.weight"] = down
            state[f"{prefix}.lora_up.weight"] = up
            state[f"{prefix}.alpha"] = torch.tensor(rank / 2.0)
        else:
            state[f"{prefix}.lora_A.weight"] = down
            state[f"{prefix}.lora_B.weight"] = up
    return LoraFile(filename=f"{name}.safetensors", name=name, state_dict=state)


def add_loras_like_networks(lora_module, unet, loras: list[tuple[LoraFile, float]]):
    """The unet half of extensions-builtin/sd_forge_lora/networks.py load_lora_for_models, per LoRA, with
    `lora_module` = the tier's backend.patcher.lora: its key map (called with the model only, as
    networks.py calls it), load_lora, clone, add_patches (offline). The input patcher is not modified."""
    for lora_file, weight in loras:
        key_map = lora_module.model_lora_keys_unet(unet.model)
        patches, unmatched = lora_module.load_lora(lora_file.state_dict, key_map)
        if len(unmatched) > MAX_UNMATCHED_KEYS or not patches:  # "version mismatch" / nothing for the unet
            continue
        new_unet = unet.clone()
        loaded = new_unet.add_patches(
            filename=lora_file.filename, patches=patches, strength_patch=weight, online_mode=False
        )
        if len([k for k in patches if k not in loaded]) <= MAX_UNMATCHED_KEYS:
            unet = new_unet
    return unet


# ---------------------------------------------------------------------------------------------- sampling


def random_conds(dm, kind: str, batch: int, n_txt: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random conds for one prompt per image, from the model's config. FLUX as diffusion_engine/flux.py
    builds them: T5 crossattn, CLIP pooled vector, (dev only) the distilled guidance. SDXL as
    diffusion_engine/sdxl.py: crossattn = CLIP-L | CLIP-G hidden states, 77 tokens per prompt chunk;
    vector = pooled CLIP-G + size embeddings."""
    config = dm.config
    if kind == "sdxl":
        if n_txt <= 0 or n_txt % CLIP_CHUNK_TOKENS:
            raise ValueError(f"SDXL crossattn length must be a positive multiple of {CLIP_CHUNK_TOKENS}, not {n_txt}")
        return dict(
            crossattn=torch.randn(batch, n_txt, config["context_dim"], generator=gen),  # [B, 77k, ctx]
            vector=torch.randn(batch, config["adm_in_channels"], generator=gen),  # [B, adm]
        )
    conds = dict(
        crossattn=torch.randn(batch, n_txt, config["context_in_dim"], generator=gen),  # [B, n_txt, ctx]
        vector=torch.randn(batch, config["vec_in_dim"], generator=gen),  # [B, vec]
    )
    if config["guidance_embed"]:
        conds["guidance"] = torch.full((batch,), DISTILLED_GUIDANCE)  # [B]
    return conds


def noise_and_conds(
    dm, kind: str, *, batch: int, height: int, width: int, n_txt: int | None, cfg: float, seed: int
) -> tuple[torch.Tensor, dict, dict | None]:
    """(noise [B, C_latent, H/8, W/8], cond, uncond or None at cfg 1), in that order from one generator.
    `n_txt` None means DEFAULT_N_TXT of the kind."""
    n_txt = DEFAULT_N_TXT[kind] if n_txt is None else n_txt
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, LATENT_CHANNELS[kind], height // 8, width // 8, generator=gen)
    cond = random_conds(dm, kind, batch, n_txt, gen)
    uncond = random_conds(dm, kind, batch, n_txt, gen) if cfg != 1.0 else None  # processing.py: None at CFG 1
    return noise, cond, uncond


def simple_sigmas(predictor, steps: int) -> torch.Tensor:
    """Forge's "Simple" schedule (modules/sd_schedulers.py, the FLUX and SDXL preset default): `steps`
    entries of the predictor's ascending sigma table at a stride of len/steps from the top, then 0."""
    table = predictor.sigmas  # [n], ascending (10000 for PredictionFlux, 1000 for the EPS Prediction)
    stride = len(table) / steps
    return torch.tensor([*(float(table[-(1 + int(i * stride))]) for i in range(steps)), 0.0], dtype=torch.float32)


def euler_sample(
    x: torch.Tensor,
    sigmas: torch.Tensor,
    denoise: Callable[[int, torch.Tensor], torch.Tensor],
    on_step: Callable[[int], None] | None = None,
    raise_at_step: int | None = None,
) -> torch.Tensor:
    """Euler steps from `x` (at sigmas[0]) down `sigmas`; per step i: on_step(i), the interruption
    (RuntimeError "interrupted") when i == raise_at_step, then denoised = denoise(i, x)."""
    for i in range(len(sigmas) - 1):
        if on_step is not None:
            on_step(i)
        if raise_at_step == i:
            raise RuntimeError("interrupted")
        denoised = denoise(i, x)
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x
