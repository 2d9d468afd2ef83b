"""Self-tests of the real-Forge harness's SDXL side: the shared ones (tests/forge_common/harness_selftests_sdxl.py)
and the real tier's own name-map check (Forge's diffusers->SGM map lives in packages_3rdparty)."""

import importlib

from tests.forge_common.harness_selftests_sdxl import *  # noqa: F403 - the shared self-tests


def test_forges_sdxl_name_maps_address_the_models_transformer_parameters(harness, unet):
    """Forge's diffusers->SGM map for this config names exactly the transformer parameters the model has,
    and the kohya and diffusers LoRA names of the capture point land on the same weight."""
    params = set(unet.model.state_dict())
    lora_utils = importlib.import_module("packages_3rdparty.comfyui_lora_collection.utils")
    diffusers_to_sgm = lora_utils.unet_to_diffusers(unet.model.diffusion_model.config)
    mapped = {f"diffusion_model.{v}" for v in diffusers_to_sgm.values() if ".transformer_blocks." in v}
    assert mapped == {p for p in params if ".transformer_blocks." in p}
    key_map = harness.forge.lora.model_lora_keys_unet(unet.model, {})
    q = "output_blocks.0.1.transformer_blocks.0.attn2.to_q"
    assert key_map["lora_unet_" + q.replace(".", "_")] == f"diffusion_model.{q}.weight"
    diffusers_q = "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    assert key_map[diffusers_q] == f"diffusion_model.{q}.weight"
