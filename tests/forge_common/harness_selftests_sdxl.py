"""Self-tests of a harness's SDXL side, written once and run against both tiers: a tiny SDXL-layout UNet
is built, merged and sampled the way Forge does it, including the attn2 replace patches that FreeFuse
must coexist with (IPAdapter registers them).

tests/forge_standin/test_harness_sdxl.py and tests/forge/test_harness_sdxl.py import these tests; each tier
provides the `harness` fixture.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from tests.forge_common.harness_conventions import LoraFile
from tests.forge_common.harness_selftests import (
    assert_within,
    pop_all_loras,
    seconds_per_default_sample,
    spy_on_before_sampling,
)

CAPTURE = "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn2"  # FreeFuse's SDXL capture point
Q_KEY = f"{CAPTURE}.to_q.weight"
CONV_KEY = "diffusion_model.input_blocks.4.0.in_layers.2.weight"
# level of each SpatialTransformer in the default layout (transformer_depth (0, 0, 1, 1, 2, 2))
TRANSFORMER_LEVEL = {
    "input_blocks.4.1": 1,
    "input_blocks.5.1": 1,
    "input_blocks.7.1": 2,
    "input_blocks.8.1": 2,
    "middle_block.1": 2,
    "output_blocks.0.1": 2,
    "output_blocks.1.1": 2,
    "output_blocks.2.1": 2,
    "output_blocks.3.1": 1,
    "output_blocks.4.1": 1,
    "output_blocks.5.1": 1,
}
N_TRANSFORMER_BLOCKS = 16  # depths 1+1+2+2 (input) + 1 (middle) + 2+2+2+1+1+1 (output)


@pytest.fixture(scope="module")
def unet(harness):
    return harness.make_sdxl_unet(seed=0)


def _spatial_transformers(harness, unet):
    return {
        name: module
        for name, module in unet.model.diffusion_model.named_modules()
        if isinstance(module, harness.unet_module.SpatialTransformer)
    }


def _with_hooks(harness, unet, register, **sample_kwargs):
    """Sample once with hooks from `register(diffusion_model) -> handles`, removed afterwards."""
    handles = register(unet.model.diffusion_model)
    try:
        return harness.sample(unet, **sample_kwargs)
    finally:
        for handle in handles:
            handle.remove()


# --- model -----------------------------------------------------------------------------------------------


def test_model_is_the_unet_wrapped_with_the_eps_predictor(harness, unet):
    dm = unet.model.diffusion_model
    assert type(dm) is harness.unet_module.IntegratedUNet2DConditionModel
    assert type(unet).__name__ == "UnetPatcher" and type(unet.model).__name__ == "KModel"
    predictor = unet.model.predictor
    assert type(predictor) is importlib.import_module("backend.modules.k_prediction").Prediction
    assert predictor.prediction_type == "epsilon"
    assert len(predictor.sigmas) == 1000 and 14.0 < float(predictor.sigmas[-1]) < 15.0  # SDXL's sigma_max 14.6
    ops = importlib.import_module("backend.operations").ForgeOperations
    q_proj = dm.get_submodule("output_blocks.0.1.transformer_blocks.0.attn2.to_q")
    assert type(q_proj) is ops.Linear and not isinstance(q_proj, torch.nn.Linear)
    conv = dm.get_submodule("input_blocks.4.0.in_layers.2")
    assert type(conv) is ops.Conv2d and isinstance(conv, torch.nn.Conv2d)
    assert dm.out[2].weight.abs().sum() > 0
    assert (len(dm.input_blocks), len(dm.output_blocks)) == (9, 9)
    downsample = dm.get_submodule("input_blocks.3.0")
    assert type(downsample).__name__ == "Downsample" and downsample.op.stride == (2, 2)
    assert type(dm.get_submodule("output_blocks.2.2")).__name__ == "Upsample"
    assert dm.label_emb[0][0].in_features == 16 and dm.time_embed[0].out_features == 4 * 32


def test_transformers_sit_where_sdxl_has_them_and_never_at_the_first_level(harness, unet):
    depths = {name: len(st.transformer_blocks) for name, st in _spatial_transformers(harness, unet).items()}
    assert set(depths) == set(TRANSFORMER_LEVEL)
    assert {name: depths[name] for name in depths if TRANSFORMER_LEVEL[name] == 2} == {
        "input_blocks.7.1": 2,
        "input_blocks.8.1": 2,
        "middle_block.1": 1,
        "output_blocks.0.1": 2,
        "output_blocks.1.1": 2,
        "output_blocks.2.1": 2,
    }


def test_capture_point_attn2_has_q_k_v_and_out_projections(harness, unet):
    dm = unet.model.diffusion_model
    for k in range(2):
        attn2 = dm.get_submodule(f"output_blocks.0.1.transformer_blocks.{k}.attn2")
        assert type(attn2) is harness.unet_module.CrossAttention
        assert (attn2.to_q.in_features, attn2.to_k.in_features, attn2.to_v.in_features) == (128, 32, 32)
        assert attn2.to_out[0].out_features == 128 and attn2.heads == 128 // 16
    assert harness.merged_weight(unet, Q_KEY).shape == (128, 128)


def test_full_depth_layout_builds_and_samples(harness):
    big = harness.make_sdxl_unet(
        transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_middle=10,
        transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10), seed=1,
    )  # fmt: skip
    key = "diffusion_model.output_blocks.0.1.transformer_blocks.9.attn2.to_k.weight"
    assert harness.merged_weight(big, key).shape == (128, 32)
    assert torch.isfinite(harness.sample(big, steps=1)).all()


def test_sampling_is_deterministic_and_depends_on_the_seed(harness, unet):
    first = harness.sample(unet, seed=3)
    assert first.shape == (1, 4, 8, 8) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, harness.sample(unet, seed=3))
    assert not torch.allclose(first, harness.sample(unet, seed=4))


def test_model_weights_are_the_same_for_the_same_seed(harness):
    a, b, c = (harness.make_sdxl_unet(seed=s) for s in (5, 5, 6))
    assert torch.equal(harness.merged_weight(a, CONV_KEY), harness.merged_weight(b, CONV_KEY))
    assert not torch.equal(harness.merged_weight(a, CONV_KEY), harness.merged_weight(c, CONV_KEY))


def test_eps_predictor_scales_the_input_and_subtracts_sigma_times_eps(unet):
    predictor = unet.model.predictor
    sigmas = predictor.sigmas
    assert (sigmas[1:] > sigmas[:-1]).all() and 0.029 < float(sigmas[0]) < 0.03  # SDXL's sigma_min 0.0292
    picked = torch.tensor([0, 1, 500, 999])
    assert torch.equal(predictor.timestep(sigmas[picked]), picked)
    sigma, x, eps = torch.tensor([3.0]), torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), 0.5)
    assert_within(predictor.calculate_input(sigma, x), x / math.sqrt(10.0), atol=1e-6)
    assert_within(predictor.calculate_denoised(sigma, eps, x), x - 1.5, atol=1e-6)


# --- LoRAs -----------------------------------------------------------------------------------------------


def test_lora_targets_linear_layers_and_locon_resblock_convs(harness, unet):
    everything = harness.make_lora(unet, name="all", seed=1).state_dict
    linear = harness.make_lora(unet, name="linear", targets="linear", seed=1).state_dict
    attn = harness.make_lora(unet, name="attn", targets="attn", seed=1).state_dict
    downs = {k: v.shape for k, v in everything.items() if k.endswith(".lora_down.weight")}
    # 16 transformer blocks x 10 Linears + 11 SpatialTransformers x proj_in/out + 17 ResBlocks x 2 convs
    assert len(downs) == N_TRANSFORMER_BLOCKS * 10 + 11 * 2 + 17 * 2
    conv = "lora_unet_input_blocks_4_0_in_layers_2"
    assert downs[f"{conv}.lora_down.weight"] == (4, 32, 3, 3)
    assert everything[f"{conv}.lora_up.weight"].shape == (64, 4, 1, 1)
    assert "lora_unet_output_blocks_8_0_out_layers_3.lora_down.weight" in everything
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_0_proj.lora_down.weight" in everything
    assert all(v.ndim == 2 for k, v in linear.items() if not k.endswith(".alpha"))
    assert len(linear) == 3 * (N_TRANSFORMER_BLOCKS * 10 + 11 * 2)
    assert len(attn) == 3 * N_TRANSFORMER_BLOCKS * 8 and all("_attn1_" in k or "_attn2_" in k for k in attn)
    with pytest.raises(ValueError):
        harness.make_lora(unet, name="x", fmt="diffusers")


@pytest.mark.parametrize("layers", ["all", "linear", "conv"])
def test_a_kohya_lora_changes_the_output_and_leaves_the_input_patcher_alone(harness, unet, layers):
    base = harness.sample(unet, seed=1)
    full = harness.make_lora(unet, name="subject_a", seed=11)
    is_conv = {k.split(".")[0] for k, v in full.state_dict.items() if v.ndim == 4}
    keep = {
        k: v
        for k, v in full.state_dict.items()
        if layers == "all" or (k.split(".")[0] in is_conv) == (layers == "conv")
    }
    lora = LoraFile(filename="subject_a.safetensors", name="subject_a", state_dict=keep)
    with_lora = harness.add_loras(unet, [(lora, 1.0)])
    assert with_lora is not unet and unet.lora_patches == {}
    identifier = ("subject_a.safetensors", 1.0, 1.0, False)
    assert list(with_lora.lora_patches) == [identifier]
    assert len(with_lora.lora_patches[identifier]) == len(keep) // 3  # every layer matched (216 for "all")
    assert (harness.sample(with_lora, seed=1) - base).abs().max() > 1e-3
    assert torch.equal(harness.sample(unet, seed=1), base)


def test_kohya_merges_are_base_plus_strength_alpha_over_rank_up_down(harness, unet):
    rank, strength = 4, 0.8
    lora = harness.make_lora(unet, name="kohya_sdxl", rank=rank, seed=21)
    harness.sample(unet, steps=1)
    base_q, base_conv = harness.merged_weight(unet, Q_KEY), harness.merged_weight(unet, CONV_KEY)
    patched = harness.add_loras(unet, [(lora, strength)])
    harness.sample(patched, steps=1)

    sd = lora.state_dict
    q = "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_q"
    alpha = float(sd[f"{q}.alpha"])
    assert alpha / rank == 0.5
    delta_q = sd[f"{q}.lora_up.weight"] @ sd[f"{q}.lora_down.weight"]  # [out, r] @ [r, in]
    assert_within(harness.merged_weight(patched, Q_KEY), base_q + strength * alpha / rank * delta_q, atol=1e-6)
    conv = "lora_unet_input_blocks_4_0_in_layers_2"
    up, down = sd[f"{conv}.lora_up.weight"], sd[f"{conv}.lora_down.weight"]  # [out, r, 1, 1], [r, in, 3, 3]
    delta_conv = (up.flatten(1) @ down.flatten(1)).reshape(base_conv.shape)  # [out, in, 3, 3]
    merged_conv = harness.merged_weight(patched, CONV_KEY)
    assert_within(merged_conv, base_conv + strength * alpha / rank * delta_conv, atol=1e-6)


def test_popping_the_lora_from_a_clone_restores_base_weights_and_output_exactly(harness, unet):
    base_out = harness.sample(unet, seed=2)
    base_q, base_conv = harness.merged_weight(unet, Q_KEY), harness.merged_weight(unet, CONV_KEY)
    patched = harness.add_loras(unet, [(harness.make_lora(unet, name="popped", seed=41), 1.0)])
    lora_out = harness.sample(patched, seed=2)
    assert not torch.equal(harness.merged_weight(patched, CONV_KEY), base_conv)

    assert torch.equal(harness.sample(patched, seed=2, before_sampling=pop_all_loras), base_out)
    assert torch.equal(harness.merged_weight(patched, Q_KEY), base_q)
    assert torch.equal(harness.merged_weight(patched, CONV_KEY), base_conv)
    assert torch.equal(harness.sample(patched, seed=2), lora_out)


# --- sampling --------------------------------------------------------------------------------------------


def _record_unet_calls(harness, unet, **sample_kwargs):
    seen = []

    def pre_hook(module, args, kwargs):
        options = kwargs["transformer_options"]
        seen.append((list(options["cond_or_uncond"]), tuple(args[0].shape), tuple(kwargs["context"].shape)))

    _with_hooks(
        harness, unet, lambda dm: [dm.register_forward_pre_hook(pre_hook, with_kwargs=True)], steps=2, **sample_kwargs
    )
    return seen


def test_cfg_above_one_runs_uncond_first_in_one_batch(harness, unet):
    seen = _record_unet_calls(harness, unet, cfg=5.0, batch=2, height=64, width=96)
    assert seen == [([1, 0], (4, 4, 8, 12), (4, 77, 32))] * 2


def test_cfg_one_runs_cond_only(harness, unet):
    assert _record_unet_calls(harness, unet, cfg=1.0) == [([0], (1, 4, 8, 8), (1, 77, 32))] * 2


def test_crossattn_is_77_tokens_per_chunk(harness, unet):
    assert _record_unet_calls(harness, unet, n_txt=154) == [([0], (1, 4, 8, 8), (1, 154, 32))] * 2
    with pytest.raises(ValueError, match="multiple of 77"):
        harness.sample(unet, n_txt=100)


def test_cross_attention_calls_the_unet_modules_attention_function_at_call_time(harness, unet, monkeypatch):
    calls = []
    original = harness.unet_module.attention_function

    def counting(q, k, v, heads, mask=None):
        calls.append((tuple(q.shape), tuple(k.shape), heads, mask))
        return original(q, k, v, heads, mask)

    def unreachable(*args, **kwargs):
        raise AssertionError("backend.attention.attention_function is bound by name in backend.nn.unet")

    monkeypatch.setattr(harness.unet_module, "attention_function", counting)
    monkeypatch.setattr(importlib.import_module("backend.attention"), "attention_function", unreachable)
    harness.sample(unet, steps=1, height=64, width=96)
    assert len(calls) == N_TRANSFORMER_BLOCKS * 2  # attn1 and attn2 of every transformer block
    # input_blocks.4.1 (level 1, 4x6 tokens, 64 channels = 4 heads of 16): self, then cross attention
    assert calls[0] == ((1, 24, 64), (1, 24, 64), 4, None)
    assert calls[1] == ((1, 24, 64), (1, 77, 64), 4, None)


def _observed_grids(harness, unet, height, width):
    grids, options = {}, {}

    def recorder(name):
        def pre_hook(module, args):
            x, _context, transformer_options = args  # TimestepEmbedSequential calls layer(x, context, options)
            grids[name] = tuple(x.shape)
            options[name] = (transformer_options["block"], list(transformer_options["original_shape"]))

        return pre_hook

    def register(dm):
        return [st.register_forward_pre_hook(recorder(n)) for n, st in _spatial_transformers(harness, unet).items()]

    _with_hooks(harness, unet, register, steps=1, height=height, width=width)
    return grids, options


@pytest.mark.parametrize(
    ("height", "width", "latent"),
    [(64, 96, (8, 12)), (72, 104, (9, 13)), (40, 56, (5, 7)), (96, 64, (12, 8))],
)
def test_each_level_halves_the_latent_grid_rounding_up(harness, unet, height, width, latent):
    grids, options = _observed_grids(harness, unet, height, width)
    for name, level in TRANSFORMER_LEVEL.items():
        expected = tuple(math.ceil(side / 2**level) for side in latent)  # stride-2 convs, padding 1
        assert grids[name] == (1, 32 * 2**level, *expected), name  # [B, C, h, w]
    assert options["output_blocks.0.1"] == (("output", 0), [1, 4, *latent])
    assert options["middle_block.1"][0] == ("middle", 0)


def test_transformer_blocks_see_block_and_block_index(harness, unet):
    seen = []

    def pre_hook(module, args, kwargs):
        options = kwargs["transformer_options"]
        seen.append((options["block"], options["block_index"], list(options["cond_or_uncond"])))

    def register(dm):
        blocks = [dm.get_submodule(f"output_blocks.0.1.transformer_blocks.{k}") for k in range(2)]
        return [block.register_forward_pre_hook(pre_hook, with_kwargs=True) for block in blocks]

    _with_hooks(harness, unet, register, steps=1, cfg=2.0)
    assert seen == [(("output", 0), 0, [1, 0]), (("output", 0), 1, [1, 0])]


def _replace_patch_run(harness, unet, register_patches):
    """Sample (cfg 2, one step) with attn2 replace patches added to a clone; returns (output, calls)."""
    calls = []

    def before_sampling(u, sigmas, x, cond, uncond):
        clone = u.clone()
        register_patches(clone, calls)
        return clone

    return harness.sample(unet, steps=1, cfg=2.0, before_sampling=before_sampling), calls


def test_an_attn2_replace_patch_runs_instead_of_the_plain_attention(harness, unet, monkeypatch):
    plain_out, _ = _replace_patch_run(harness, unet, lambda clone, calls: None)
    attention = harness.unet_module.attention_function

    def replacing(clone, calls):
        def patch(q, k, v, extra_options):
            calls.append((tuple(q.shape), tuple(k.shape), extra_options["block"], extra_options["block_index"]))
            assert extra_options["n_heads"] == 8 and extra_options["dim_head"] == 16
            assert extra_options["original_shape"] == [2, 4, 8, 8] and extra_options["cond_or_uncond"] == [1, 0]
            return attention(q, k, v, extra_options["n_heads"])  # [B, N, H*D], before to_out

        clone.set_model_attn2_replace(patch, "output", 0, 0)
        assert ("output", 0, 0) in clone.model_options["transformer_options"]["patches_replace"]["attn2"]

    same_out, calls = _replace_patch_run(harness, unet, replacing)
    assert calls == [((2, 4, 128), (2, 77, 128), ("output", 0), 0)]  # block 0 of output_blocks.0.1, 2x2 tokens
    assert torch.equal(same_out, plain_out)

    plain_calls = []
    monkeypatch.setattr(harness.unet_module, "attention_function", lambda *a: plain_calls.append(1) or attention(*a))
    _replace_patch_run(
        harness, unet, lambda clone, calls: clone.set_model_attn2_replace(lambda q, k, v, e: q, "output", 0, 0)
    )
    assert len(plain_calls) == N_TRANSFORMER_BLOCKS * 2 - 1  # that one attn2 no longer calls attention_function


def test_replace_patches_fall_back_from_block_index_to_the_whole_block(harness, unet):
    def register(clone, calls):
        def whole_block(q, k, v, extra_options):
            calls.append(("block", extra_options["block_index"]))
            return torch.zeros_like(q)

        def first_only(q, k, v, extra_options):
            calls.append(("index 0", extra_options["block_index"]))
            return torch.zeros_like(q)

        clone.set_model_attn2_replace(whole_block, "output", 0)
        clone.set_model_attn2_replace(first_only, "output", 0, 0)

    plain_out, _ = _replace_patch_run(harness, unet, lambda clone, calls: None)
    zeroed_out, calls = _replace_patch_run(harness, unet, register)
    assert calls == [("index 0", 0), ("block", 1)]
    assert not torch.allclose(zeroed_out, plain_out)


def test_step_callbacks_and_before_sampling_follow_the_flux_contract(harness, unet):
    steps, got = [], {}
    spy = spy_on_before_sampling(got)
    with pytest.raises(RuntimeError, match="interrupted"):
        harness.sample(unet, steps=4, cfg=2.0, on_step=steps.append, raise_at_step=2, before_sampling=spy)
    assert steps == [0, 1, 2]
    sigmas = got["sigmas"]
    assert len(sigmas) == 5 and sigmas[-1] == 0 and (sigmas[:-1] > sigmas[1:]).all()
    assert sigmas[0] == unet.model.predictor.sigmas[-1]
    assert got["x"].shape == (1, 4, 8, 8)
    assert got["cond"]["crossattn"].shape == (1, 77, 32) and got["cond"]["vector"].shape == (1, 16)
    assert not torch.equal(got["cond"]["crossattn"], got["uncond"]["crossattn"])


def test_a_default_sample_is_fast(harness, unet):
    assert seconds_per_default_sample(harness, unet) < 2.0
