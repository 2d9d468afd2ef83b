"""Random kohya LoRAs for the tiny checkpoints (lora_unet_* / lora_te1_* with lora_down, lora_up, alpha).

Runs in Forge's Python next to tiny_checkpoints.py. Factors follow harness_conventions.random_lora_factors
(alpha = rank / 2); with scale 1 a LoRA's delta is as large as the random base weight, so taking one LoRA
away visibly changes the image.
- FLUX (fits flux_a and its GGUF versions): every Linear of the 19 double blocks (img/txt attn qkv and proj,
  img/txt mlp 0 and 2) and of the 38 single blocks (linear1, linear2).
- SDXL (fits sdxl_a), diffusers-style kohya names as sd-scripts writes them
  (lora_unet_up_blocks_0_attentions_0_transformer_blocks_3_attn2_to_k): every transformer's proj_in/out,
  attn1/attn2 q/k/v/out, ff; LoCon (3x3 conv) on every ResBlock's conv1 and conv2.
- CLIP-L text-encoder-only (lora_te1_text_model_encoder_layers_N_*): fits every tiny checkpoint.
"""

from __future__ import annotations

import re

import torch

from tests.forge_common.harness_conventions import random_lora_factors
from tests.webui import sizes
from tests.webui.tiny_checkpoints import FLUX_REPO, clip_text, flux_transformer_config, meta_shapes, sdxl_unet_kwargs

FLUX_DOUBLE_LINEARS = [
    "img_attn.qkv",
    "img_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_attn.qkv",
    "txt_attn.proj",
    "txt_mlp.0",
    "txt_mlp.2",
]
FLUX_SINGLE_LINEARS = ["linear1", "linear2"]
_SDXL_T = r"(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
_SDXL_BLOCK = r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
SDXL_LINEAR = re.compile(rf"^{_SDXL_T}\.(proj_in|proj_out|{_SDXL_BLOCK})\.weight$")
SDXL_CONV = re.compile(
    r"^((input_blocks|output_blocks)\.\d+\.0|middle_block\.[02])\.(in_layers\.2|out_layers\.3)\.weight$"
)
CLIP_LINEAR = {
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
}


def kohya_lora(shapes: dict[str, torch.Size], seed: int, scale: float) -> dict[str, torch.Tensor]:
    """{prefix: weight shape} -> a kohya state dict (fp16, as kohya files are)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, shape in shapes.items():
        down, up = random_lora_factors(tuple(shape), sizes.LORA_RANK, scale, gen)
        state[f"{prefix}.lora_down.weight"] = down.to(torch.float16)
        state[f"{prefix}.lora_up.weight"] = up.to(torch.float16)
        state[f"{prefix}.alpha"] = torch.tensor(sizes.LORA_RANK / 2.0, dtype=torch.float16)
    return state


def flux_targets() -> dict[str, torch.Size]:
    from backend.nn.flux import IntegratedFluxTransformer2DModel

    shapes = meta_shapes(lambda: IntegratedFluxTransformer2DModel(**flux_transformer_config("flux_a")))
    targets = {}
    for blocks, linears, count in (
        ("double_blocks", FLUX_DOUBLE_LINEARS, sizes.FLUX_DOUBLE_BLOCKS),
        ("single_blocks", FLUX_SINGLE_LINEARS, sizes.FLUX_SINGLE_BLOCKS),
    ):
        for i in range(count):
            for linear in linears:
                key = f"{blocks}.{i}.{linear}"
                targets["lora_unet_" + key.replace(".", "_")] = shapes[f"{key}.weight"]
    return targets


def sdxl_targets() -> dict[str, torch.Size]:
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from huggingface_guess.utils import unet_to_diffusers

    kwargs = sdxl_unet_kwargs("sdxl_a")
    shapes = meta_shapes(lambda: IntegratedUNet2DConditionModel(**kwargs))
    to_diffusers = {ldm: diffusers for diffusers, ldm in unet_to_diffusers(kwargs).items()}
    targets = {}
    for key, shape in shapes.items():
        if SDXL_LINEAR.match(key) or SDXL_CONV.match(key):
            targets["lora_unet_" + to_diffusers[key].removesuffix(".weight").replace(".", "_")] = shape
    return targets


def clip_l_targets(forge) -> dict[str, torch.Size]:
    weights = clip_text(forge, FLUX_REPO, "text_encoder", 0)
    targets = {}
    for layer in range(sizes.CLIP_L["num_hidden_layers"]):
        for module, name in CLIP_LINEAR.items():
            targets[f"lora_te1_text_model_encoder_layers_{layer}_{name}"] = weights[
                f"text_model.encoder.layers.{layer}.{module}.weight"
            ].shape
    return targets


def all_loras(forge) -> dict[str, dict[str, torch.Tensor]]:
    """{file stem: state dict} of every LoRA the tier uses."""
    flux, sdxl, te = flux_targets(), sdxl_targets(), clip_l_targets(forge)
    loras = {}
    for name, seed in sizes.FLUX_SUBJECT_LORAS.items():
        loras[name] = kohya_lora(flux, seed, scale=1.0)
    for name, seed in sizes.FLUX_STYLE_LORAS.items():
        loras[name] = kohya_lora(flux, seed, scale=0.8)
    for name, seed in sizes.SDXL_SUBJECT_LORAS.items():
        loras[name] = kohya_lora(sdxl, seed, scale=1.0)
    for name, seed in sizes.SDXL_STYLE_LORAS.items():
        loras[name] = kohya_lora(sdxl, seed, scale=0.8)
    for name, seed in sizes.TEXT_ENCODER_LORAS.items():
        loras[name] = kohya_lora(te, seed, scale=1.0)
    return loras
