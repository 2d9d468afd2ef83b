"""FreeFuse on an SDXL-layout UNet inside Forge, written once and run against both harnesses.

Same equivalences as FLUX (tests/forge_common/flux_behaviour.py): masks all ones == LoRAs merged (Linear and
LoCon conv layers); a zero mask == that LoRA absent; capture at the configured step; CFG and batch; nothing
survives a run. Masks here are given on the latent grid and resized by FreeFuse to every UNet level.
"""

from __future__ import annotations

import pytest
import torch

from freefuse.forge import session as sessions
from freefuse.forge.session import Session
from freefuse.settings import FreeFuseSettings
from tests.forge_common.flux_behaviour import Runner, _clean_hooks

# float32 rounding differs between a merged weight and a runtime delta; EPS latents reach |x| ~ 30 here
TOL = dict(rtol=1e-3, atol=1e-4)


def _settings(**changes) -> FreeFuseSettings:
    base = dict(enabled=True, capture_block=1, capture_step=1, attention_bias=False, token_exclusion=False)
    base.update(changes)
    return FreeFuseSettings.defaults("sdxl").replace(**base)


def latent_grid(x):
    return tuple(x.shape[-2:])


def runner(harness, settings, subjects, **kw):
    return Runner(harness, settings, subjects, grid_of=latent_grid, **kw)


def _without_text_side(lora):
    """A LoRA without attn2 to_k/to_v (the text-side projections FreeFuse never masks spatially)."""
    kept = {k: v for k, v in lora.state_dict.items() if "attn2_to_k" not in k and "attn2_to_v" not in k}
    return type(lora)(filename=lora.filename, name=lora.name, state_dict=kept)


@pytest.fixture
def sdxl(harness):
    unet = harness.make_sdxl_unet(seed=0)
    loras = {n: harness.make_lora(unet, name=n, seed=i + 1) for i, n in enumerate("ABC")}
    return harness, unet, loras


def test_all_ones_masks_equal_the_loras_merged_including_locon_convs(sdxl):
    harness, unet, loras = sdxl
    merged = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 0.8)])
    reference = harness.sample(merged, seed=3, cfg=2.0)
    run = runner(harness, _settings(), [loras["A"], loras["B"]], masks=("ones", "ones"), keep_open=True)
    try:
        out = run.sample(merged, seed=3, cfg=2.0)
        layouts = {layer.layout for layer in run.session.runtime.layers}
        left_merged = run.session.runtime.left_merged
    finally:
        sessions.close_active()
    torch.testing.assert_close(out, reference, **TOL)
    assert {"image", "text", "conv"} <= layouts, layouts
    assert not left_merged


def test_a_zero_mask_equals_generating_without_that_lora(sdxl):
    harness, unet, loras = sdxl
    a, b = _without_text_side(loras["A"]), _without_text_side(loras["B"])
    without_b = harness.sample(harness.add_loras(unet, [(a, 1.0)]), seed=4)
    both = harness.add_loras(unet, [(a, 1.0), (b, 1.0)])
    out = runner(harness, _settings(), [a, b], masks=("ones", "zeros")).sample(both, seed=4)
    torch.testing.assert_close(out, without_b, **TOL)
    assert not torch.allclose(harness.sample(both, seed=4), without_b, **TOL)


@pytest.mark.parametrize(("schedule", "expected"), [("restart", 2 + 4), ("continue", 4)])
def test_masks_are_captured_at_the_configured_step_on_the_capture_levels_grid(sdxl, schedule, expected):
    harness, unet, loras = sdxl
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    run = runner(harness, _settings(schedule=schedule), [loras["A"], loras["B"]])
    run.sample(both, seed=5, steps=4, height=72, width=104, cfg=3.0, batch=2)
    masks = run.session.masks
    assert masks is not None, run.session.messages
    assert masks.masks.shape == (2, 2, 3, 4)  # output_blocks.0 of a 9x13 latent: 9x13 -> 5x7 -> 3x4
    assert len(run.calls) == expected
    modes = [mode for _, mode in run.calls]
    assert modes == (["off"] * 2 + ["masked"] * 4 if schedule == "restart" else ["full", "full", "masked", "masked"])


def test_cross_attention_bias_changes_the_image_and_is_removed_afterwards(sdxl):
    harness, unet, loras = sdxl
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    attention = harness.unet_module.attention_function
    plain = runner(harness, _settings(), [loras["A"], loras["B"]], masks=("left", "right")).sample(both, seed=6)
    biased = runner(harness, _settings(attention_bias=True), [loras["A"], loras["B"]], masks=("left", "right"))
    out = biased.sample(both, seed=6, cfg=2.0)
    assert not torch.allclose(out, plain, **TOL)
    assert harness.unet_module.attention_function is attention


def test_an_attn2_replace_patch_keeps_working_beside_freefuse(sdxl):
    harness, unet, loras = sdxl
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    calls = []

    def patch(q, k, v, extra_options):
        calls.append(extra_options.get("block"))
        return harness.unet_module.attention_function(q, k, v, extra_options["n_heads"])

    patched = both.clone()
    patched.set_model_attn2_replace(patch, "output", 0, 0)
    run = runner(harness, _settings(attention_bias=True), [loras["A"], loras["B"]])
    out = run.sample(patched, seed=7, steps=3)
    assert calls and torch.isfinite(out).all()
    assert run.session.masks is not None


def test_no_hook_or_swap_survives_a_run_or_a_failed_one(sdxl):
    harness, unet, loras = sdxl
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    before = harness.sample(both, seed=8)
    hooks = _clean_hooks(unet)
    attention = harness.unet_module.attention_function
    runner(harness, _settings(schedule="continue", attention_bias=True), [loras["A"], loras["B"]]).sample(both, seed=8)
    assert sessions.active() is None and _clean_hooks(unet) == hooks
    run = runner(harness, _settings(attention_bias=True), [loras["A"], loras["B"]], keep_open=True)
    with pytest.raises(RuntimeError, match="interrupted"):
        harness.sample(both, seed=8, before_sampling=run.before_sampling, raise_at_step=2)
    run.remove_spies()
    assert isinstance(sessions.active(), Session)  # left open, as after an exception in Forge ...
    again = harness.sample(both, seed=8)  # ... and the next model call that is not FreeFuse's closes it
    assert sessions.active() is None
    assert harness.unet_module.attention_function is attention and _clean_hooks(unet) == hooks
    torch.testing.assert_close(again, before, rtol=0, atol=0)
