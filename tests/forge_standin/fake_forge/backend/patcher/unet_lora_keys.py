"""Diffusers UNet parameter names -> SD/SDXL (SGM) UNet paths, as Forge's comfyui_lora_collection maps them.

Not a Forge module (Forge keeps this as `unet_to_diffusers` in packages_3rdparty/comfyui_lora_collection/
utils.py); `backend.patcher.lora.model_lora_keys_unet` uses it so that kohya files with diffusers names
("lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q") land on the same weight as the SGM
name ("lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_q"). Returns {} for configs without
"num_res_blocks" (FLUX). Block numbering: input block n = 1 + (res_blocks + 1) * level + i (the
Downsample after level L is input block 1 + (res_blocks + 1) * (L + 1) - 1, named even after the last
level, where the model has none), output block n = (res_blocks + 1) * level + i counted from the
deepest level, the Upsample sits at index 1, or 2 when that output block has a transformer.
"""

_TRANSFORMER_CONTAINER = ("proj_in", "proj_out", "norm")  # weight and bias each
_TRANSFORMER_BLOCK = (
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
)  # fmt: skip
# SGM ResBlock part -> diffusers resnet part (weight and bias each)
_RESNET = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
    "in_layers.0": "norm1",
    "out_layers.0": "norm2",
}
# diffusers name -> SGM path, outside the blocks (weight and bias each)
_TOP_LEVEL = {
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
}


def _resnet(src: str, dst: str) -> dict:
    return {f"{src}.{d}.{end}": f"{dst}.{s}.{end}" for s, d in _RESNET.items() for end in ("weight", "bias")}


def _transformer(src: str, dst: str, depth: int) -> dict:
    out = {f"{src}.{p}.{end}": f"{dst}.{p}.{end}" for p in _TRANSFORMER_CONTAINER for end in ("weight", "bias")}
    for t in range(depth):
        out.update(
            {f"{src}.transformer_blocks.{t}.{p}": f"{dst}.transformer_blocks.{t}.{p}" for p in _TRANSFORMER_BLOCK}
        )
    return out


def unet_to_diffusers(unet_config) -> dict:
    """{diffusers parameter name: SGM parameter path} for an SD/SDXL UNet config."""
    if "num_res_blocks" not in unet_config:
        return {}
    res_blocks = list(unet_config["num_res_blocks"])
    depths_in = list(unet_config["transformer_depth"])
    depths_out = list(unet_config["transformer_depth_output"])
    levels = len(unet_config["channel_mult"])
    out = {}
    for level in range(levels):
        n = 1 + (res_blocks[level] + 1) * level
        for i in range(res_blocks[level]):
            out.update(_resnet(f"down_blocks.{level}.resnets.{i}", f"input_blocks.{n}.0"))
            depth = depths_in.pop(0)
            if depth > 0:
                out.update(_transformer(f"down_blocks.{level}.attentions.{i}", f"input_blocks.{n}.1", depth))
            n += 1
        for end in ("weight", "bias"):
            out[f"down_blocks.{level}.downsamplers.0.conv.{end}"] = f"input_blocks.{n}.0.op.{end}"

    out.update(_transformer("mid_block.attentions.0", "middle_block.1", unet_config.get("transformer_depth_middle")))
    for i, n in enumerate((0, 2)):
        out.update(_resnet(f"mid_block.resnets.{i}", f"middle_block.{n}"))

    res_blocks.reverse()
    for level in range(levels):
        n = (res_blocks[level] + 1) * level
        for i in range(res_blocks[level] + 1):
            out.update(_resnet(f"up_blocks.{level}.resnets.{i}", f"output_blocks.{n}.0"))
            depth = depths_out.pop()
            if depth > 0:
                out.update(_transformer(f"up_blocks.{level}.attentions.{i}", f"output_blocks.{n}.1", depth))
            if i == res_blocks[level]:
                index = 2 if depth > 0 else 1
                for end in ("weight", "bias"):
                    out[f"up_blocks.{level}.upsamplers.0.conv.{end}"] = f"output_blocks.{n}.{index}.conv.{end}"
            n += 1

    for name, path in _TOP_LEVEL.items():
        for end in ("weight", "bias"):
            out[f"{name}.{end}"] = f"{path}.{end}"
    return out
