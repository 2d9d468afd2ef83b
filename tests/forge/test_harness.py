"""The real-Forge harness itself is right: it builds, merges and samples the way Forge does."""

import pytest
import torch

QKV_KEY = "diffusion_model.double_blocks.0.img_attn.qkv.weight"


@pytest.fixture(scope="module")
def unet(harness):
    return harness.make_flux_unet(seed=0)


def _lora_scale(state_dict, prefix, rank):
    alpha = state_dict.get(f"{prefix}.alpha")
    return float(alpha) / rank if alpha is not None else 1.0


def test_model_is_built_from_forges_own_classes(harness, unet):
    dm = unet.model.diffusion_model
    assert type(dm) is harness.flux_module.IntegratedFluxTransformer2DModel
    assert type(unet).__name__ == "UnetPatcher" and type(unet.model).__name__ == "KModel"
    assert type(dm.double_blocks[0].img_attn.qkv) is harness.forge.operations.ForgeOperations.Linear
    assert (len(dm.double_blocks), len(dm.single_blocks)) == (3, 2)
    assert dm.img_in.weight.shape == (64, 64)  # 16 latent channels x 2 x 2 patches -> hidden
    assert dm.final_layer.linear.weight.abs().sum() > 0


def test_full_depth_model_builds_with_every_block(harness):
    big = harness.make_flux_unet(n_double=19, n_single=38, seed=1)
    dm = big.model.diffusion_model
    assert (len(dm.double_blocks), len(dm.single_blocks)) == (19, 38)
    assert harness.merged_weight(big, "diffusion_model.single_blocks.37.linear1.weight").shape == (7 * 64, 64)


def test_sampling_is_deterministic_and_depends_on_the_seed(harness, unet):
    first = harness.sample(unet, seed=3)
    again = harness.sample(unet, seed=3)
    other = harness.sample(unet, seed=4)
    assert first.shape == (1, 16, 8, 8) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_model_weights_are_the_same_for_the_same_seed(harness):
    a = harness.make_flux_unet(seed=5)
    b = harness.make_flux_unet(seed=5)
    c = harness.make_flux_unet(seed=6)
    assert torch.equal(harness.merged_weight(a, QKV_KEY), harness.merged_weight(b, QKV_KEY))
    assert not torch.equal(harness.merged_weight(a, QKV_KEY), harness.merged_weight(c, QKV_KEY))


def test_every_block_calls_the_module_level_attention_at_call_time(harness, unet, monkeypatch):
    calls = []
    original = harness.flux_module.attention

    def counting_attention(q, k, v, pe):
        calls.append((tuple(q.shape), tuple(pe.shape)))
        return original(q, k, v, pe)

    monkeypatch.setattr(harness.flux_module, "attention", counting_attention)
    harness.sample(unet, steps=2, n_txt=8)
    assert len(calls) == 2 * (3 + 2)
    # q [B, heads, L_txt + L_img, head_dim]; pe [B, 1, L, head_dim/2, 2, 2]; 64x64 px -> 4x4 tokens
    assert calls[0] == ((1, 2, 8 + 16, 32), (1, 1, 8 + 16, 16, 2, 2))


def test_an_added_lora_changes_the_output_and_leaves_the_input_patcher_alone(harness, unet):
    base = harness.sample(unet, seed=1)
    lora = harness.make_lora(unet, name="subject_a", seed=11)
    with_lora = harness.add_loras(unet, [(lora, 1.0)])
    assert with_lora is not unet and unet.lora_patches == {}
    assert list(with_lora.lora_patches) == [("subject_a.safetensors", 1.0, 1.0, False)]
    out = harness.sample(with_lora, seed=1)
    assert (out - base).abs().max() > 1e-3
    assert torch.equal(harness.sample(unet, seed=1), base)


def test_kohya_qkv_merge_is_base_plus_strength_alpha_over_rank_up_down(harness, unet):
    rank, strength = 4, 0.8
    lora = harness.make_lora(unet, name="kohya_qkv", rank=rank, fmt="kohya", seed=21)
    prefix = "lora_unet_double_blocks_0_img_attn_qkv"
    up = lora.state_dict[f"{prefix}.lora_up.weight"]  # [3*hidden, r]
    down = lora.state_dict[f"{prefix}.lora_down.weight"]  # [r, hidden]
    scale = _lora_scale(lora.state_dict, prefix, rank)
    assert scale == 0.5

    harness.sample(unet, steps=1)  # base weights merged (none)
    base = harness.merged_weight(unet, QKV_KEY)
    patched = harness.add_loras(unet, [(lora, strength)])
    harness.sample(patched, steps=1)
    merged = harness.merged_weight(patched, QKV_KEY)
    torch.testing.assert_close(merged, base + strength * scale * up @ down, rtol=1e-5, atol=1e-6)


def test_diffusers_to_k_merges_into_the_k_rows_of_the_fused_qkv(harness, unet):
    rank, strength, hidden = 4, 0.7, 64
    lora = harness.make_lora(unet, name="diffusers_k", rank=rank, fmt="diffusers", targets="attn", seed=31)
    prefix = "transformer.transformer_blocks.0.attn.to_k"
    up = lora.state_dict[f"{prefix}.lora_B.weight"]  # [hidden, r]
    down = lora.state_dict[f"{prefix}.lora_A.weight"]  # [r, hidden]
    q_up = lora.state_dict["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    q_down = lora.state_dict["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    scale = _lora_scale(lora.state_dict, prefix, rank)  # no alpha in diffusers files -> 1

    patched = harness.add_loras(unet, [(lora, strength)])
    entries = patched.lora_patches[("diffusers_k.safetensors", strength, 1.0, False)][QKV_KEY]
    assert sorted(e[3] for e in entries) == [(0, 0, hidden), (0, hidden, hidden), (0, 2 * hidden, hidden)]

    harness.sample(unet, steps=1)
    base = harness.merged_weight(unet, QKV_KEY)
    harness.sample(patched, steps=1)
    merged = harness.merged_weight(patched, QKV_KEY)
    k_rows = slice(hidden, 2 * hidden)
    torch.testing.assert_close(merged[k_rows], base[k_rows] + strength * scale * up @ down, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged[:hidden], base[:hidden] + strength * q_up @ q_down, rtol=1e-5, atol=1e-6)


def test_popping_the_lora_from_a_clone_restores_base_weights_and_output_exactly(harness, unet):
    base_out = harness.sample(unet, seed=2)
    base_w = harness.merged_weight(unet, QKV_KEY)
    lora = harness.make_lora(unet, name="popped", seed=41)
    patched = harness.add_loras(unet, [(lora, 1.0)])
    lora_out = harness.sample(patched, seed=2)
    assert not torch.equal(harness.merged_weight(patched, QKV_KEY), base_w)

    def pop_all(u, sigmas, x, cond, uncond):
        clone = u.clone()
        for ident in list(clone.lora_patches):
            clone.lora_patches.pop(ident)
        return clone

    popped_out = harness.sample(patched, seed=2, before_sampling=pop_all)
    assert torch.equal(harness.merged_weight(patched, QKV_KEY), base_w)
    assert torch.equal(popped_out, base_out)
    assert list(patched.lora_patches) == [("popped.safetensors", 1.0, 1.0, False)]
    assert torch.equal(harness.sample(patched, seed=2), lora_out)


def _record_transformer_options(harness, unet, **sample_kwargs):
    seen = []

    def pre_hook(module, args, kwargs):
        options = kwargs["transformer_options"]
        seen.append((list(options["cond_or_uncond"]), list(options["cond_indices"]), tuple(args[0].shape)))

    handle = unet.model.diffusion_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        harness.sample(unet, steps=2, **sample_kwargs)
    finally:
        handle.remove()
    return seen


def test_cfg_above_one_runs_uncond_first_in_one_batch(harness, unet):
    seen = _record_transformer_options(harness, unet, cfg=3.0, batch=2, height=64, width=48)
    assert seen == [([1, 0], [2, 3], (4, 16, 8, 6))] * 2


def test_cfg_one_runs_cond_only(harness, unet):
    seen = _record_transformer_options(harness, unet, cfg=1.0)
    assert seen == [([0], [0], (1, 16, 8, 8))] * 2


def test_cfg_changes_the_result(harness, unet):
    assert not torch.allclose(harness.sample(unet, cfg=1.0), harness.sample(unet, cfg=3.0))


def test_on_step_sees_every_step_in_order(harness, unet):
    steps = []
    harness.sample(unet, steps=5, on_step=steps.append)
    assert steps == [0, 1, 2, 3, 4]


def test_raise_at_step_interrupts_after_that_steps_callback(harness, unet):
    steps = []
    with pytest.raises(RuntimeError, match="interrupted"):
        harness.sample(unet, steps=4, on_step=steps.append, raise_at_step=2)
    assert steps == [0, 1, 2]


def test_before_sampling_gets_the_scaled_noise_and_the_conds(harness, unet):
    got = {}

    def spy(u, sigmas, x, cond, uncond):
        got.update(sigmas=sigmas, x=x, cond=cond, uncond=uncond)
        return u

    harness.sample(unet, steps=4, cfg=2.0, n_txt=6, before_sampling=spy)
    assert got["sigmas"][0] == 1.0 and got["sigmas"][-1] == 0.0 and len(got["sigmas"]) == 5
    assert (got["sigmas"][:-1] > got["sigmas"][1:]).all()
    assert got["x"].shape == (1, 16, 8, 8)
    assert got["cond"]["crossattn"].shape == (1, 6, 32) and got["cond"]["vector"].shape == (1, 16)
    assert not torch.equal(got["cond"]["crossattn"], got["uncond"]["crossattn"])
