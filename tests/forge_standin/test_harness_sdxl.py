"""Self-tests of the stand-in harness's SDXL side: the shared ones (tests/forge_common/harness_selftests_sdxl.py)
and the stand-in's own name-map check (its diffusers->SGM map lives in backend/patcher/unet_lora_keys.py)."""

import importlib

from tests.forge_common.harness_selftests_sdxl import *  # noqa: F403 - the shared self-tests


def test_sdxl_name_maps_address_the_models_transformer_parameters(harness, unet):
    """The diffusers->SGM map names only parameters the model has, and the kohya SGM and diffusers LoRA
    names of the capture point land on the same weight."""
    params = set(unet.model.state_dict())
    unet_to_diffusers = importlib.import_module("backend.patcher.unet_lora_keys").unet_to_diffusers
    mapped = {f"diffusion_model.{v}" for v in unet_to_diffusers(unet.model.diffusion_model.config).values()}
    transformer_params = {p for p in params if ".transformer_blocks." in p}
    assert transformer_params <= mapped
    assert {m for m in mapped if ".transformer_blocks." in m} <= params
    key_map = importlib.import_module("backend.patcher.lora").model_lora_keys_unet(unet.model, {})
    q = "output_blocks.0.1.transformer_blocks.0.attn2.to_q"
    assert key_map["lora_unet_" + q.replace(".", "_")] == f"diffusion_model.{q}.weight"
    assert (
        key_map["lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"] == f"diffusion_model.{q}.weight"
    )
    out = "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn2.to_out.0.weight"
    assert key_map["unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out"] == out
