"""Self-tests of the stand-in harness: it behaves like Forge where FreeFuse's Forge layer depends on it."""

import sys
import time
import types

import pytest
import torch

from .harness import LoraFile

QKV0 = "diffusion_model.double_blocks.0.img_attn.qkv.weight"


def _capture_transformer_options(seen: list):
    """A before_sampling that records transformer_options of every diffusion_model call."""

    def before_sampling(unet, sigmas, x, cond, uncond):
        def hook(module, args, kwargs):
            seen.append(kwargs["transformer_options"])

        unet.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
        return unet

    return before_sampling


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """Elementwise |actual - expected| <= atol (torch.testing.assert_close costs ~3 s to import)."""
    assert actual.shape == expected.shape
    worst = (actual - expected).abs().max().item()
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"


# --- the stand-in is installed for this directory only ---------------------------------------------------


def test_backend_is_the_stand_in_during_these_tests(harness):
    from .standin_modules import is_standin_module

    assert is_standin_module(harness.flux_module)
    assert sys.modules["backend.nn.flux"] is harness.flux_module


def test_standin_forge_sets_other_backend_modules_aside_and_restores_them():
    from .standin_modules import is_standin_module, standin_forge

    installed = {n: m for n, m in sys.modules.items() if n == "backend" or n.startswith("backend.")}
    for name in installed:
        del sys.modules[name]
    foreign = types.ModuleType("backend")
    sys.modules["backend"] = foreign
    path_before = list(sys.path)
    try:
        with standin_forge():
            import backend.nn.flux as flux

            assert is_standin_module(flux)
            assert sys.modules["backend"] is not foreign
        assert sys.modules["backend"] is foreign
        assert "backend.nn.flux" not in sys.modules
        assert sys.path == path_before
    finally:
        sys.modules.pop("backend", None)
        sys.modules.update(installed)


# --- model -----------------------------------------------------------------------------------------------


def test_sampling_is_deterministic_for_a_seed(harness):
    first = harness.sample(harness.make_flux_unet(seed=0), seed=1)
    again = harness.sample(harness.make_flux_unet(seed=0), seed=1)
    other_noise = harness.sample(harness.make_flux_unet(seed=0), seed=2)
    other_model = harness.sample(harness.make_flux_unet(seed=1), seed=1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_noise)
    assert not torch.allclose(first, other_model)


def test_linear_layers_are_modules_but_not_torch_linear(harness):
    qkv = harness.make_flux_unet().model.diffusion_model.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, torch.nn.Module)
    assert not isinstance(qkv, torch.nn.Linear)
    assert qkv.weight.shape == (3 * 64, 64) and qkv.bias.shape == (3 * 64,)


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


def test_blocks_look_up_the_module_level_attention_at_call_time(harness):
    unet = harness.make_flux_unet(n_double=3, n_single=2)
    flux = harness.flux_module
    original = flux.attention
    calls = []

    def counting(q, k, v, pe):
        calls.append(q.shape)
        return original(q, k, v, pe)

    flux.attention = counting
    try:
        harness.sample(unet, steps=2)
    finally:
        flux.attention = original
    assert len(calls) == (3 + 2) * 2


# --- LoRAs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_a_lora_changes_the_output(harness, fmt):
    unet = harness.make_flux_unet()
    lora = harness.make_lora(unet, name="subject", fmt=fmt)
    base = harness.sample(unet)
    with_lora = harness.sample(harness.add_loras(unet, [(lora, 1.0)]))
    assert (with_lora - base).abs().max() > 1e-2


def test_kohya_qkv_merge_is_base_plus_scaled_up_down(harness):
    unet = harness.make_flux_unet()
    rank, strength = 4, 0.8
    lora = harness.make_lora(unet, name="subject", rank=rank, fmt="kohya")
    base = harness.merged_weight(unet, QKV0)
    patched = harness.add_loras(unet, [(lora, strength)])
    harness.sample(patched, steps=1)  # the merge happens when sampling loads the patcher
    prefix = "lora_unet_double_blocks_0_img_attn_qkv"
    up, down = lora.state_dict[f"{prefix}.lora_up.weight"], lora.state_dict[f"{prefix}.lora_down.weight"]
    alpha = lora.state_dict[f"{prefix}.alpha"].item()
    assert alpha != rank
    expected = base + strength * (alpha / rank) * (up @ down)
    _assert_within(harness.merged_weight(patched, QKV0), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("lora_key", "model_key", "start", "size"),
    [
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
def test_diffusers_lora_merges_into_its_slice_of_the_fused_weight(harness, lora_key, model_key, start, size):
    unet = harness.make_flux_unet()
    full = harness.make_lora(unet, name="subject", fmt="diffusers")
    only = {k: v for k, v in full.state_dict.items() if k.startswith(lora_key + ".")}
    assert len(only) == 2  # lora_A, lora_B; no alpha in diffusers files
    lora = LoraFile(filename="subject.safetensors", name="subject", state_dict=only)
    base = harness.merged_weight(unet, model_key)
    patched = harness.add_loras(unet, [(lora, 0.6)])
    assert list(patched.lora_patches[("subject.safetensors", 0.6, 1.0, False)]) == [model_key]
    harness.sample(patched, steps=1)
    merged = harness.merged_weight(patched, model_key)
    delta = 0.6 * (only[lora_key + ".lora_B.weight"] @ only[lora_key + ".lora_A.weight"])
    _assert_within(merged[start : start + size], base[start : start + size] + delta, atol=1e-6)
    assert torch.equal(merged[:start], base[:start])
    assert torch.equal(merged[start + size :], base[start + size :])


def test_popping_a_lora_from_a_clone_restores_base_weights_and_output(harness):
    unet = harness.make_flux_unet()
    base_out = harness.sample(unet)
    base_w = harness.merged_weight(unet, QKV0)
    patched = harness.add_loras(unet, [(harness.make_lora(unet, name="subject"), 0.8)])
    lora_out = harness.sample(patched)
    assert not torch.equal(harness.merged_weight(patched, QKV0), base_w)
    identifier = ("subject.safetensors", 0.8, 1.0, False)

    def pop_subject(u, sigmas, x, cond, uncond):
        clone = u.clone()
        clone.lora_patches.pop(identifier)
        return clone

    popped_out = harness.sample(patched, before_sampling=pop_subject)
    assert torch.equal(popped_out, base_out)
    assert torch.equal(harness.merged_weight(patched, QKV0), base_w)
    assert identifier in patched.lora_patches  # the source patcher keeps its LoRA
    assert torch.equal(harness.sample(patched), lora_out)  # and loading it again re-merges


def test_merge_is_keyed_on_lora_identifiers_only(harness):
    unet = harness.make_flux_unet()
    first = harness.add_loras(unet, [(harness.make_lora(unet, name="subject", seed=0), 1.0)])
    harness.sample(first, steps=1)
    merged_first = harness.merged_weight(first, QKV0)
    same_identifier = harness.add_loras(unet, [(harness.make_lora(unet, name="subject", seed=1), 1.0)])
    harness.sample(same_identifier, steps=1)
    assert torch.equal(harness.merged_weight(same_identifier, QKV0), merged_first)  # contents not re-merged


def test_clone_shares_patch_contents_and_deep_copies_model_options(harness):
    unet = harness.make_flux_unet()
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
    identifier = next(iter(patched.lora_patches))
    assert clone.lora_patches is not patched.lora_patches
    assert clone.lora_patches[identifier] is patched.lora_patches[identifier]
    copied_closure, copied_method = clone.model_options["sampler_pre_cfg_function"]
    assert copied_closure is closure
    assert copied_method.__self__ is not holder


# --- sampling --------------------------------------------------------------------------------------------


def test_cfg_above_one_batches_uncond_first(harness):
    unet = harness.make_flux_unet()
    seen = []
    harness.sample(unet, steps=2, cfg=3.0, before_sampling=_capture_transformer_options(seen))
    assert len(seen) == 2
    assert seen[0]["cond_or_uncond"] == [1, 0]
    assert (seen[0]["uncond_indices"], seen[0]["cond_indices"]) == ([0], [1])
    assert seen[0]["sigmas"].shape == (1,)


def test_cfg_one_runs_cond_rows_only(harness):
    seen = []
    harness.sample(harness.make_flux_unet(), steps=1, batch=2, before_sampling=_capture_transformer_options(seen))
    assert seen[0]["cond_or_uncond"] == [0]
    assert seen[0]["cond_indices"] == [0, 1]


def test_pre_cfg_functions_get_forges_arguments_first(harness):
    unet = harness.make_flux_unet()
    events = []

    def before_sampling(u, sigmas, x, cond, uncond):
        clone = u.clone()

        def pre_cfg(model, cond, uncond, x, timestep, model_options):
            events.append(("pre", model is clone.model, uncond is not None, tuple(timestep.shape)))
            return model, cond, uncond, x, timestep, model_options

        clone.add_sampler_pre_cfg_function(pre_cfg)
        clone.model.diffusion_model.register_forward_pre_hook(lambda m, args: events.append(("model",)))
        return clone

    harness.sample(unet, steps=2, cfg=2.0, before_sampling=before_sampling)
    assert events == [("pre", True, True, (1,)), ("model",)] * 2


def test_on_step_sees_every_step_in_order(harness):
    steps = []
    harness.sample(harness.make_flux_unet(), steps=5, on_step=steps.append)
    assert steps == [0, 1, 2, 3, 4]


def test_raise_at_step_interrupts_before_that_step_runs(harness):
    unet = harness.make_flux_unet()
    steps, model_calls = [], []
    unet.model.diffusion_model.register_forward_pre_hook(lambda m, args: model_calls.append(1))
    with pytest.raises(RuntimeError, match="interrupted"):
        harness.sample(unet, steps=4, on_step=steps.append, raise_at_step=2)
    assert steps == [0, 1, 2]
    assert len(model_calls) == 2


def test_a_default_sample_is_fast(harness):
    unet = harness.make_flux_unet()
    harness.sample(unet, steps=1)  # warm-up
    start = time.perf_counter()
    harness.sample(unet)
    assert time.perf_counter() - start < 2.0
