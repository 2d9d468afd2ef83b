"""Random-weight state dicts of the tiny FLUX and SDXL checkpoints, keyed as real single-file checkpoints are.

Runs in Forge's Python (FORGE_PYTHON) with the test copy of Forge importable (see build_models.py): the
parameter names and shapes come from meta builds of Forge's own classes (and transformers' CLIP), built
from the copy's patched bundled configs; the weights follow tests/forge_common/harness_conventions.py.

Single-file layouts (what backend/loader.py + huggingface_guess split):
- FLUX: model.diffusion_model.* (transformer), text_encoders.clip_l.transformer.text_model.* (CLIP-L),
  text_encoders.t5xxl.transformer.* (T5 encoder, shared), vae.* (LDM VAE names).
- SDXL: model.diffusion_model.* (LDM UNet), conditioner.embedders.0.transformer.text_model.* (CLIP-L),
  conditioner.embedders.1.model.* (open-CLIP ViT-bigG names: transformer.resblocks.N.attn.in_proj_weight,
  token_embedding, positional_embedding, ln_final, text_projection), first_stage_model.* (LDM VAE names).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from tests.forge_common.harness_conventions import flux_config, random_weights
from tests.webui import sizes

FLUX_REPO = "backend/huggingface/black-forest-labs/FLUX.1-dev"
SDXL_REPO = "backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0"


def meta_shapes(make: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Parameter names and shapes (state-dict order) of a module built on the meta device."""
    with torch.device("meta"):
        module = make()
    return {k: v.shape for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def _config(forge: Path, path: str) -> dict:
    return json.loads((forge / path / "config.json").read_text(encoding="utf-8"))


def clip_text(forge: Path, repo: str, component: str, seed: int) -> dict[str, torch.Tensor]:
    """A CLIP text model with transformers' names (text_model.*) plus text_projection.weight."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**_config(forge, f"{repo}/{component}"))
    shapes = meta_shapes(lambda: CLIPTextModel(config))
    shapes["text_projection.weight"] = torch.Size([config.projection_dim, config.hidden_size])
    return random_weights(shapes, seed, torch.float32)


def t5_encoder(forge: Path, seed: int) -> dict[str, torch.Tensor]:
    """Forge's T5 encoder (backend/nn/t5.py) with the names a T5 file has: encoder.*, shared.weight."""
    from backend.nn.t5 import IntegratedT5

    config = _config(forge, f"{FLUX_REPO}/text_encoder_2")
    shapes = meta_shapes(lambda: IntegratedT5(config))
    shapes = {k.removeprefix("transformer."): v for k, v in shapes.items() if k.startswith("transformer.")}
    return random_weights(shapes, seed, torch.float32)


def vae(forge: Path, repo: str, seed: int) -> dict[str, torch.Tensor]:
    """Forge's AutoencoderKL (LDM names: encoder.down.0.block.0..., decoder.mid.attn_1...)."""
    from backend.nn.vae import IntegratedAutoencoderKL

    config = _config(forge, f"{repo}/vae")
    return random_weights(meta_shapes(lambda: IntegratedAutoencoderKL.from_config(config)), seed, torch.float32)


def flux_transformer_config(name: str) -> dict:
    dims = sizes.FLUX[name]
    return flux_config(
        n_double=sizes.FLUX_DOUBLE_BLOCKS,
        n_single=sizes.FLUX_SINGLE_BLOCKS,
        hidden=dims["hidden"],
        heads=dims["heads"],
        context_dim=sizes.T5["d_model"],
        vec_dim=sizes.CLIP_L["hidden_size"],
        guidance=True,
    )


def flux_transformer(name: str) -> dict[str, torch.Tensor]:
    """The FLUX.1-dev transformer `name` of sizes.FLUX, bare keys (double_blocks.0.img_attn.qkv.weight ...)."""
    from backend.nn.flux import IntegratedFluxTransformer2DModel

    config = flux_transformer_config(name)
    shapes = meta_shapes(lambda: IntegratedFluxTransformer2DModel(**config))
    return random_weights(shapes, sizes.FLUX[name]["seed"], torch.float32)


def flux_components(forge: Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """{transformer, clip_l, t5, vae} of FLUX checkpoint `name`, each with its own (file) key names."""
    seed = sizes.FLUX[name]["seed"]
    return {
        "transformer": flux_transformer(name),
        "clip_l": clip_text(forge, FLUX_REPO, "text_encoder", 1000 * seed + 1),
        "t5": t5_encoder(forge, 1000 * seed + 2),
        "vae": vae(forge, FLUX_REPO, 1000 * seed + 3),
    }


def flux_checkpoint(forge: Path, name: str) -> dict[str, torch.Tensor]:
    """A single-file FLUX.1-dev checkpoint (bf16, as FLUX files are)."""
    parts = flux_components(forge, name)
    prefixes = {
        "transformer": "model.diffusion_model.",
        "clip_l": "text_encoders.clip_l.transformer.",
        "t5": "text_encoders.t5xxl.transformer.",
        "vae": "vae.",
    }
    return {prefixes[part] + k: v.to(torch.bfloat16) for part, sd in parts.items() for k, v in sd.items()}


def sdxl_unet_kwargs(name: str) -> dict:
    """IntegratedUNet2DConditionModel keyword arguments, as huggingface_guess gives them for SDXL, narrower.
    (harness_conventions.sdxl_unet_config would also want level 0, which has no attention, to hold a head.)"""
    levels = len(sizes.SDXL_CHANNEL_MULT)
    return dict(
        in_channels=sizes.SDXL_LATENT_CHANNELS,
        out_channels=sizes.SDXL_LATENT_CHANNELS,
        model_channels=sizes.SDXL[name]["model_channels"],
        num_res_blocks=[2] * levels,
        channel_mult=list(sizes.SDXL_CHANNEL_MULT),
        transformer_depth=list(sizes.SDXL_TRANSFORMER_DEPTH),
        transformer_depth_middle=sizes.SDXL_TRANSFORMER_DEPTH_MIDDLE,
        transformer_depth_output=list(sizes.SDXL_TRANSFORMER_DEPTH_OUTPUT),
        num_head_channels=sizes.SDXL_HEAD_CHANNELS,
        num_heads=-1,
        context_dim=sizes.SDXL_CONTEXT,
        adm_in_channels=sizes.SDXL_ADM,
        num_classes="sequential",
        use_linear_in_transformer=True,
        use_spatial_transformer=True,
        use_checkpoint=False,
        dims=2,
    )


def sdxl_unet(name: str) -> dict[str, torch.Tensor]:
    """The SDXL-layout UNet `name` of sizes.SDXL, LDM keys (input_blocks.4.1.transformer_blocks.0...)."""
    from backend.nn.unet import IntegratedUNet2DConditionModel

    kwargs = sdxl_unet_kwargs(name)
    shapes = meta_shapes(lambda: IntegratedUNet2DConditionModel(**kwargs))
    return random_weights(shapes, sizes.SDXL[name]["seed"], torch.float32)


def open_clip_names(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP names -> open-CLIP names, as SDXL files store CLIP-G (inverse of huggingface_guess's
    transformers_convert): q/k/v fused into attn.in_proj_*, text_projection stored transposed."""
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].t().contiguous(),
        "logit_scale": torch.tensor(4.6052),
    }
    renames = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    layer = 0
    while f"text_model.encoder.layers.{layer}.layer_norm1.weight" in hf:
        src, dst = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = hf[f"{src}{old}.{kind}"]
        for kind in ("weight", "bias"):
            qkv = [hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
        layer += 1
    return out


def sdxl_checkpoint(forge: Path, name: str) -> dict[str, torch.Tensor]:
    """A single-file SDXL checkpoint (fp16, as SDXL files are)."""
    seed = sizes.SDXL[name]["seed"]
    clip_l = clip_text(forge, SDXL_REPO, "text_encoder", 1000 * seed + 1)
    clip_l.pop("text_projection.weight")  # SDXL's CLIP-L has none
    clip_g = open_clip_names(clip_text(forge, SDXL_REPO, "text_encoder_2", 1000 * seed + 2))
    parts = {
        "model.diffusion_model.": sdxl_unet(name),
        "conditioner.embedders.0.transformer.": clip_l,
        "conditioner.embedders.1.model.": clip_g,
        "first_stage_model.": vae(forge, SDXL_REPO, 1000 * seed + 3),
    }
    return {prefix + k: v.to(torch.float16) for prefix, sd in parts.items() for k, v in sd.items()}
