"""FLUX LoRA key names -> model parameter keys, as Forge's comfyui_lora_collection maps them.

Not a Forge module (Forge keeps this in packages_3rdparty/comfyui_lora_collection/{lora,utils}.py);
`backend.patcher.lora.model_lora_keys_unet` is the public entry point. A target is either a model key
"diffusion_model.<path>.weight", a tuple (model_key, (dim, start, size)) narrowing a fused weight, or
(model_key, None, function) for the adaLN scale/shift swap.
"""

import torch


def swap_scale_shift(weight):
    """Diffusers' norm_out stores (scale, shift); FLUX's final adaLN stores (shift, scale)."""
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


_IMG_QKV = ("to_q", "to_k", "to_v")
_TXT_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def _double_block_targets(index: int, hidden: int, out: str) -> dict:
    src, dst = f"transformer_blocks.{index}", f"{out}double_blocks.{index}"
    targets = {}
    for end in ("weight", "bias"):
        for stream, names in (("img", _IMG_QKV), ("txt", _TXT_QKV)):
            fused = f"{dst}.{stream}_attn.qkv.{end}"
            for slot, name in enumerate(names):
                targets[f"{src}.attn.{name}.{end}"] = (fused, (0, slot * hidden, hidden))
        renames = {
            "attn.to_out.0": "img_attn.proj",
            "attn.to_add_out": "txt_attn.proj",
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
        }
        for diffusers_name, flux_name in renames.items():
            targets[f"{src}.{diffusers_name}.{end}"] = f"{dst}.{flux_name}.{end}"
    norms = {
        "attn.norm_q": "img_attn.norm.query_norm",
        "attn.norm_k": "img_attn.norm.key_norm",
        "attn.norm_added_q": "txt_attn.norm.query_norm",
        "attn.norm_added_k": "txt_attn.norm.key_norm",
    }
    for diffusers_name, flux_name in norms.items():
        targets[f"{src}.{diffusers_name}.weight"] = f"{dst}.{flux_name}.scale"
    return targets


def _single_block_targets(index: int, hidden: int, out: str) -> dict:
    src, dst = f"single_transformer_blocks.{index}", f"{out}single_blocks.{index}"
    targets = {}
    for end in ("weight", "bias"):
        fused = f"{dst}.linear1.{end}"  # rows [q | k | v | mlp]; mlp = 4*hidden hard-coded, as in Forge
        for slot, name in enumerate(("to_q", "to_k", "to_v")):
            targets[f"{src}.attn.{name}.{end}"] = (fused, (0, slot * hidden, hidden))
        targets[f"{src}.proj_mlp.{end}"] = (fused, (0, 3 * hidden, 4 * hidden))
        targets[f"{src}.norm.linear.{end}"] = f"{dst}.modulation.lin.{end}"
        targets[f"{src}.proj_out.{end}"] = f"{dst}.linear2.{end}"
    targets[f"{src}.attn.norm_q.weight"] = f"{dst}.norm.query_norm.scale"
    targets[f"{src}.attn.norm_k.weight"] = f"{dst}.norm.key_norm.scale"
    return targets


_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}


def flux_to_diffusers(config: dict, output_prefix: str = "") -> dict:
    """{diffusers parameter name: target} for a FLUX config with depth / depth_single_blocks / hidden_size."""
    hidden = config.get("hidden_size", 0)
    targets = {}
    for index in range(config.get("depth", 0)):
        targets.update(_double_block_targets(index, hidden, output_prefix))
    for index in range(config.get("depth_single_blocks", 0)):
        targets.update(_single_block_targets(index, hidden, output_prefix))
    for end in ("weight", "bias"):
        for diffusers_name, flux_name in _TOP_LEVEL.items():
            targets[f"{diffusers_name}.{end}"] = f"{output_prefix}{flux_name}.{end}"
        targets[f"norm_out.linear.{end}"] = (
            f"{output_prefix}final_layer.adaLN_modulation.1.{end}",
            None,
            swap_scale_shift,
        )
    return targets
