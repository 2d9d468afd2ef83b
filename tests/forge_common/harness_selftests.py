"""Self-tests of a harness's FLUX side, written once and run against both tiers: the model is built,
merged and sampled the way Forge does it where FreeFuse's Forge layer depends on it.

tests/forge_standin/test_harness.py and tests/forge/test_harness.py import these tests; each tier provides
the `harness` fixture (interface: tests/forge_common/harness_interface.py).
"""

from __future__ import annotations

import importlib
import time

import pytest
import torch

from tests.forge_common.harness_conventions import LoraFile

QKV0 = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
SUBJECT = ("subject.safetensors", 1.0, 1.0, False)  # Forge's LoRA identifier: file, strength, clip, online


@pytest.fixture(scope="module")
def unet(harness):
    """The default tiny FLUX, shared by the tests that leave it as they found it."""
    return harness.make_flux_unet(seed=0)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """Elementwise |actual - expected| <= atol (torch.testing.assert_close costs ~3 s to import)."""
    assert actual.shape == expected.shape
    worst = (actual - expected).abs().max().item()
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"


def pop_all_loras(unet, sigmas, x, cond, uncond):
    """A before_sampling that drops every LoRA from a clone of the patcher."""
    clone = unet.clone()
    for identifier in list(clone.lora_patches):
        clone.lora_patches.pop(identifier)
    return clone


def spy_on_before_sampling(got: dict):
    """A before_sampling that keeps its arguments in `got` (sigmas, x, cond, uncond) and changes nothing."""

    def spy(unet, sigmas, x, cond, uncond):
        got.update(sigmas=sigmas, x=x, cond=cond, uncond=uncond)
        return unet

    return spy


def seconds_per_default_sample(harness, unet) -> float:
    """Wall time of one default `sample` of `unet`, after a one-step warm-up."""
    harness.sample(unet, steps=1)
    start = time.perf_counter()
    harness.sample(unet)
    return time.perf_counter() - start


def record_model_calls(harness, unet, record, **sample_kwargs) -> list:
    """Sample with a forward pre-hook (with kwargs) on the diffusion model; the list of `record(args, kwargs)`."""
    seen = []
    handle = unet.model.diffusion_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(record(args, kwargs)), with_kwargs=True
    )
    try:
        harness.sample(unet, **sample_kwargs)
    finally:
        handle.remove()
    return seen


# --- model -----------------------------------------------------------------------------------------------


def test_model_is_built_from_the_backends_own_classes(harness, unet):
    dm = unet.model.diffusion_model
    assert type(dm) is harness.flux_module.IntegratedFluxTransformer2DModel
    assert type(unet).__name__ == "UnetPatcher" and type(unet.model).__name__ == "KModel"
    qkv = dm.double_blocks[0].img_attn.qkv
    assert type(qkv) is importlib.import_module("backend.operations").ForgeOperations.Linear
    assert isinstance(qkv, torch.nn.Module) and not isinstance(qkv, torch.nn.Linear)
    assert qkv.weight.shape == (3 * 64, 64) and qkv.bias.shape == (3 * 64,)
    assert (len(dm.double_blocks), len(dm.single_blocks)) == (3, 2)
    assert dm.img_in.weight.shape == (64, 64)  # 16 latent channels x 2 x 2 patches -> hidden
    assert dm.final_layer.linear.weight.abs().sum() > 0


def test_full_depth_model_builds_with_every_block(harness):
    big = harness.make_flux_unet(n_double=19, n_single=38, seed=1)
    dm = big.model.diffusion_model
    assert (len(dm.double_blocks), len(dm.single_blocks)) == (19, 38)
    assert harness.merged_weight(big, "diffusion_model.single_blocks.37.linear1.weight").shape == (7 * 64, 64)


def test_sampling_is_deterministic_and_depends_on_the_seeds(harness, unet):
    first = harness.sample(unet, seed=1)
    assert first.shape == (1, 16, 8, 8) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, harness.sample(harness.make_flux_unet(seed=0), seed=1))
    assert not torch.allclose(first, harness.sample(unet, seed=2))
    assert not torch.allclose(first, harness.sample(harness.make_flux_unet(seed=1), seed=1))


def test_model_weights_are_the_same_for_the_same_seed(harness):
    a, b, c = (harness.make_flux_unet(seed=s) for s in (5, 5, 6))
    assert torch.equal(harness.merged_weight(a, QKV0), harness.merged_weight(b, QKV0))
    assert not torch.equal(harness.merged_weight(a, QKV0), harness.merged_weight(c, QKV0))


def test_blocks_are_called_with_keywords_and_joint_rope_tables(harness):
    unet = harness.make_flux_unet(n_double=2, n_single=1)
    model = unet.model.diffusion_model
    calls = []
    for block in [*model.double_blocks, *model.single_blocks]:
        block.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append((len(args), sorted(kwargs), kwargs["pe"].shape)), with_kwargs=True
        )
    harness.sample(unet, steps=1, height=64, width=32, n_txt=5)
    l_joint = 5 + 4 * 2  # text first, then a 4 x 2 grid of image tokens
    pe_shape = (1, 1, l_joint, 16, 2, 2)  # [B, 1, L, D/2, 2, 2], D = 64 / 2 heads
    assert calls == [
        (0, ["img", "pe", "txt", "vec"], pe_shape),
        (0, ["img", "pe", "txt", "vec"], pe_shape),
        (1, ["pe", "vec"], pe_shape),
    ]


def test_image_tokens_are_row_major_2x2_patches(harness):
    unet = harness.make_flux_unet()
    seen = []
    unet.model.diffusion_model.img_in.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    latent = torch.randn(1, 16, 4, 6)  # h_len 2, w_len 3
    context, y, guidance = torch.randn(1, 3, 32), torch.randn(1, 16), torch.full((1,), 3.5)
    unet.model.diffusion_model(latent, torch.ones(1), context=context, y=y, guidance=guidance)
    tokens = seen[0]  # [1, 6, 64]
    for row in range(2):
        for col in range(3):
            patch = latent[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].reshape(-1)  # (c, ph, pw)
            assert torch.equal(tokens[0, row * 3 + col], patch)


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


# --- LoRAs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_an_added_lora_changes_the_output_and_leaves_the_input_patcher_alone(harness, unet, fmt):
    base = harness.sample(unet, seed=1)
    with_lora = harness.add_loras(unet, [(harness.make_lora(unet, name="subject", fmt=fmt, seed=11), 1.0)])
    assert with_lora is not unet and unet.lora_patches == {}
    assert list(with_lora.lora_patches) == [SUBJECT]
    assert (harness.sample(with_lora, seed=1) - base).abs().max() > 1e-2
    assert torch.equal(harness.sample(unet, seed=1), base)


def test_kohya_qkv_merge_is_base_plus_strength_alpha_over_rank_up_down(harness, unet):
    rank, strength = 4, 0.8
    lora = harness.make_lora(unet, name="kohya_qkv", rank=rank, fmt="kohya", seed=21)
    prefix = "lora_unet_double_blocks_0_img_attn_qkv"
    up = lora.state_dict[f"{prefix}.lora_up.weight"]  # [3*hidden, r]
    down = lora.state_dict[f"{prefix}.lora_down.weight"]  # [r, hidden]
    alpha = lora.state_dict[f"{prefix}.alpha"].item()
    assert alpha / rank == 0.5

    harness.sample(unet, steps=1)  # base weights merged (none)
    base = harness.merged_weight(unet, QKV0)
    patched = harness.add_loras(unet, [(lora, strength)])
    harness.sample(patched, steps=1)  # the merge happens when sampling loads the patcher
    assert_within(harness.merged_weight(patched, QKV0), base + strength * (alpha / rank) * (up @ down), atol=1e-6)


@pytest.mark.parametrize(
    ("lora_key", "model_key", "start", "size"),
    [
        ("transformer.transformer_blocks.0.attn.to_q", QKV0, 0, 64),
        ("transformer.transformer_blocks.0.attn.to_k", QKV0, 64, 64),
        (
            "transformer.transformer_blocks.2.attn.add_v_proj",
            "diffusion_model.double_blocks.2.txt_attn.qkv.weight",
            128,
            64,
        ),
        (
            "transformer.single_transformer_blocks.1.proj_mlp",
            "diffusion_model.single_blocks.1.linear1.weight",
            192,
            256,
        ),
    ],
)
def test_diffusers_lora_merges_into_its_slice_of_the_fused_weight(harness, unet, lora_key, model_key, start, size):
    full = harness.make_lora(unet, name="subject", fmt="diffusers")
    only = {k: v for k, v in full.state_dict.items() if k.startswith(lora_key + ".")}
    assert len(only) == 2  # lora_A, lora_B; no alpha in diffusers files
    lora = LoraFile(filename="subject.safetensors", name="subject", state_dict=only)
    harness.sample(unet, steps=1)
    base = harness.merged_weight(unet, model_key)
    every_slice = harness.add_loras(unet, [(full, 0.6)]).lora_patches[("subject.safetensors", 0.6, 1.0, False)]
    rows = sorted(entry[3][1:] for entry in every_slice[model_key])  # offsets (dim 0, start, size)
    ends = [a + n for a, n in rows]
    assert [a for a, _ in rows] == [0, *ends[:-1]] and ends[-1] == base.shape[0]  # the slices tile the weight
    patched = harness.add_loras(unet, [(lora, 0.6)])
    entries = patched.lora_patches[("subject.safetensors", 0.6, 1.0, False)]
    assert list(entries) == [model_key]
    assert [entry[3] for entry in entries[model_key]] == [(0, start, size)]
    harness.sample(patched, steps=1)
    merged = harness.merged_weight(patched, model_key)
    delta = 0.6 * (only[lora_key + ".lora_B.weight"] @ only[lora_key + ".lora_A.weight"])
    assert_within(merged[start : start + size], base[start : start + size] + delta, atol=1e-6)
    assert torch.equal(merged[:start], base[:start])
    assert torch.equal(merged[start + size :], base[start + size :])


def test_popping_the_lora_from_a_clone_restores_base_weights_and_output_exactly(harness, unet):
    base_out = harness.sample(unet, seed=2)
    base_w = harness.merged_weight(unet, QKV0)
    patched = harness.add_loras(unet, [(harness.make_lora(unet, name="subject", seed=41), 1.0)])
    lora_out = harness.sample(patched, seed=2)
    assert not torch.equal(harness.merged_weight(patched, QKV0), base_w)

    assert torch.equal(harness.sample(patched, seed=2, before_sampling=pop_all_loras), base_out)
    assert torch.equal(harness.merged_weight(patched, QKV0), base_w)
    assert list(patched.lora_patches) == [SUBJECT]  # the source patcher keeps its LoRA
    assert torch.equal(harness.sample(patched, seed=2), lora_out)  # and loading it again re-merges


def test_merge_is_keyed_on_lora_identifiers_only(harness, unet):
    first = harness.add_loras(unet, [(harness.make_lora(unet, name="subject", seed=0), 1.0)])
    harness.sample(first, steps=1)
    merged_first = harness.merged_weight(first, QKV0)
    same_identifier = harness.add_loras(unet, [(harness.make_lora(unet, name="subject", seed=1), 1.0)])
    harness.sample(same_identifier, steps=1)
    assert torch.equal(harness.merged_weight(same_identifier, QKV0), merged_first)  # contents not re-merged
    harness.sample(unet, steps=1)  # leave the shared model unmerged for the next test


def test_clone_shares_patch_contents_and_deep_copies_model_options(harness, unet):
    patched = harness.add_loras(unet, [(harness.make_lora(unet, name="subject"), 1.0)])

    def closure(*args):
        return args

    class Holder:
        def method(self, *args):
            return args

    holder = Holder()
    patched.add_sampler_pre_cfg_function(closure)
    patched.add_sampler_pre_cfg_function(holder.method)
    clone = patched.clone()
    assert clone.lora_patches is not patched.lora_patches
    assert clone.lora_patches[SUBJECT] is patched.lora_patches[SUBJECT]
    copied_closure, copied_method = clone.model_options["sampler_pre_cfg_function"]
    assert copied_closure is closure
    assert copied_method.__self__ is not holder


# --- sampling --------------------------------------------------------------------------------------------


def _options(args, kwargs):
    options = kwargs["transformer_options"]
    indices = (list(options["cond_or_uncond"]), list(options["uncond_indices"]), list(options["cond_indices"]))
    return (*indices, tuple(options["sigmas"].shape), tuple(args[0].shape))


def test_cfg_above_one_runs_uncond_first_in_one_batch(harness, unet):
    seen = record_model_calls(harness, unet, _options, steps=2, cfg=3.0, batch=2, height=64, width=48)
    assert seen == [([1, 0], [0, 1], [2, 3], (2,), (4, 16, 8, 6))] * 2  # sigmas: one per image


def test_cfg_one_runs_cond_rows_only(harness, unet):
    seen = record_model_calls(harness, unet, _options, steps=2, cfg=1.0, batch=2)
    assert seen == [([0], [], [0, 1], (2,), (2, 16, 8, 8))] * 2


def test_cfg_changes_the_result(harness, unet):
    assert not torch.allclose(harness.sample(unet, cfg=1.0), harness.sample(unet, cfg=3.0))


def test_pre_cfg_functions_get_forges_arguments_first(harness, unet):
    events = []

    def before_sampling(u, sigmas, x, cond, uncond):
        clone = u.clone()

        def pre_cfg(model, cond, uncond, x, timestep, model_options):
            events.append(("pre", model is clone.model, uncond is not None, tuple(timestep.shape)))
            return model, cond, uncond, x, timestep, model_options

        clone.add_sampler_pre_cfg_function(pre_cfg)
        return clone

    record_model_calls(
        harness, unet, lambda args, kwargs: events.append(("model",)), steps=2, cfg=2.0, before_sampling=before_sampling
    )
    assert events == [("pre", True, True, (1,)), ("model",)] * 2


def test_on_step_sees_every_step_in_order(harness, unet):
    steps = []
    harness.sample(unet, steps=5, on_step=steps.append)
    assert steps == [0, 1, 2, 3, 4]


def test_raise_at_step_interrupts_after_that_steps_callback_before_it_runs(harness, unet):
    steps = []
    with pytest.raises(RuntimeError, match="interrupted"):
        record_model_calls(
            harness, unet, lambda args, kwargs: steps.append("model"), steps=4, on_step=steps.append, raise_at_step=2
        )
    assert steps == [0, "model", 1, "model", 2]


def test_before_sampling_gets_the_scaled_noise_and_the_conds(harness, unet):
    got = {}
    harness.sample(unet, steps=4, cfg=2.0, n_txt=6, before_sampling=spy_on_before_sampling(got))
    assert got["sigmas"][0] == 1.0 and got["sigmas"][-1] == 0.0 and len(got["sigmas"]) == 5
    assert (got["sigmas"][:-1] > got["sigmas"][1:]).all()
    assert got["x"].shape == (1, 16, 8, 8)
    assert got["cond"]["crossattn"].shape == (1, 6, 32) and got["cond"]["vector"].shape == (1, 16)
    assert not torch.equal(got["cond"]["crossattn"], got["uncond"]["crossattn"])


def test_a_default_sample_is_fast(harness, unet):
    assert seconds_per_default_sample(harness, unet) < 2.0
