"""A FreeFuse session across what else happens in Forge: a run that raised, another model, a model switch in the
middle of sampling, other extensions evaluating the model inside a step. Written once, run on both tiers.

Subject LoRAs A and B on the tiny FLUX of ``flux_behaviour``; the Runner installs a session the way the script
does.
"""

from __future__ import annotations

import pytest
import torch

from freefuse.forge import session as sessions
from freefuse.forge.session import Session
from tests.forge_common import flux_behaviour
from tests.forge_common.flux_behaviour import Runner, _clean_hooks, _settings

flux = flux_behaviour.flux  # the fixture


def _failed_run(harness, both, loras):
    """A FreeFuse generation that raises at step 2: Forge never reaches postprocess, the session stays open."""
    runner = Runner(harness, _settings(attention_bias=True), [loras["A"], loras["B"]], keep_open=True)
    with pytest.raises(RuntimeError, match="interrupted"):
        harness.sample(both, seed=2, before_sampling=runner.before_sampling, raise_at_step=2)
    runner.remove_spies()
    assert sessions.active() is runner.session and runner.session.live()
    return runner.session


def test_a_session_a_failed_run_left_open_does_nothing_to_another_model(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    other = harness.make_flux_unet(seed=5, hidden=32)  # another checkpoint, other widths
    clean = harness.sample(other, seed=3, height=48, width=64)
    attention = harness.flux_module.attention
    _failed_run(harness, both, loras)
    try:
        assert harness.flux_module.attention is not attention  # still swapped: the session is open ...
        out = harness.sample(other, seed=3, height=48, width=64)  # ... but it never reaches another model
        torch.testing.assert_close(out, clean, rtol=0, atol=0)
    finally:
        sessions.close_active()


def test_the_next_generation_of_the_same_model_after_a_failed_run_is_bit_identical(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    clean = harness.sample(both, seed=4)
    hooks = _clean_hooks(unet)
    attention = harness.flux_module.attention
    _failed_run(harness, both, loras)
    out = harness.sample(both, seed=4)  # the leftover session sees a call without its token and closes
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
    assert sessions.active() is None and harness.flux_module.attention is attention
    assert _clean_hooks(unet) == hooks


def test_the_step_guard_closes_a_leftover_session_before_another_model_runs(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    hooks = _clean_hooks(unet)
    attention = harness.flux_module.attention
    leftover = _failed_run(harness, both, loras)
    next_model = both.clone()  # what the next generation samples: not FreeFuse's model
    assert sessions.guard_sampling(next_model) is leftover
    assert sessions.active() is None and not leftover.live()
    assert harness.flux_module.attention is attention and _clean_hooks(unet) == hooks
    assert sessions.guard_sampling(next_model) is None  # nothing left to close


def test_the_guard_leaves_the_model_freefuse_patched_and_its_clones_alone(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    seen = {}

    def before(unet_, sigmas, x, cond, uncond):
        patched = runner.before_sampling(unet_, sigmas, x, cond, uncond)
        seen["patched"] = patched
        return patched.clone()  # another extension (FreeU, ControlNet) clones FreeFuse's model

    def guard(step):
        assert sessions.guard_sampling(seen["patched"], step) is None
        assert runner.session.live()

    runner = Runner(harness, _settings(schedule="continue"), [loras["A"], loras["B"]])
    try:
        harness.sample(both, seed=5, steps=3, before_sampling=before, on_step=guard)
    finally:
        runner.remove_spies()
        sessions.close_active()
    assert runner.session.masks is not None and not runner.session.messages


def test_a_model_switch_in_the_middle_of_sampling_stops_freefuse_and_says_so(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    refiner = harness.add_loras(harness.make_flux_unet(seed=6), [])
    attention = harness.flux_module.attention
    runner = Runner(harness, _settings(schedule="continue", capture_step=0), [loras["A"], loras["B"]])

    def switch(step):
        if step == 2:  # Forge's apply_refiner swaps the model, then the step guard runs
            assert sessions.guard_sampling(refiner, step) is runner.session

    harness.sample(both, seed=6, steps=4, before_sampling=runner.before_sampling, on_step=switch)
    runner.remove_spies()
    assert sessions.active() is None and harness.flux_module.attention is attention
    assert [step for step, _ in runner.calls] == [0, 1]  # FreeFuse acted on steps 0-1 only
    (message,) = runner.session.messages
    assert "the model changed during sampling at step 2" in message and "stopped" in message


# ---------------------------------------------------------------------- other extensions inside a step
def _reference_like(harness, seen: list):
    """What Forge's reference-only ControlNet does every step (forge_reference.py): a conditioning modifier
    that first evaluates the model on a noised reference latent through sampling_function_inner."""

    def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        gen = torch.Generator().manual_seed(len(seen))
        reference = 0.3 + torch.randn(x.shape, generator=gen).to(x) * float(timestep.flatten()[0])
        harness.sampling_function_inner(model, reference, timestep, uncond, cond, 1, model_options, seed)
        seen.append(float(timestep.flatten()[0]))
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    return modifier


def _captured(harness, both, loras, schedule, modifier=None, order="before"):
    """The capture (q of the capture block) a run takes, with or without a reference-like modifier."""
    runner = Runner(harness, _settings(schedule=schedule, capture_step=1), [loras["A"], loras["B"]])
    captured = []
    original = Session.on_capture

    def spy(self, capture):
        captured.append(capture.q_img.clone())
        return original(self, capture)

    def before(unet_, sigmas, x, cond, uncond):
        patched = runner.before_sampling(unet_, sigmas, x, cond, uncond)
        if modifier is not None and order == "after":
            patched.add_conditioning_modifier(modifier)  # ControlNet's script ran after FreeFuse's
        return patched

    start = both
    if modifier is not None and order == "before":
        start = both.clone()
        start.add_conditioning_modifier(modifier)  # ControlNet's script ran before FreeFuse's
    Session.on_capture = spy
    try:
        harness.sample(start, seed=7, steps=3, before_sampling=before)
    finally:
        Session.on_capture = original
        runner.remove_spies()
        sessions.close_active()
    return captured, runner


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("schedule", ["restart", "continue"])
def test_masks_come_only_from_the_generations_own_evaluation_never_from_a_reference_latent(flux, schedule, order):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    plain, _ = _captured(harness, both, loras, schedule)
    seen: list = []
    with_reference, runner = _captured(harness, both, loras, schedule, _reference_like(harness, seen), order)
    assert len(seen) == 3  # the modifier evaluated the model at every step
    assert len(plain) == len(with_reference) == 1
    torch.testing.assert_close(with_reference[0], plain[0], rtol=0, atol=0)
    assert runner.session.masks is not None


@pytest.mark.parametrize("schedule", ["restart", "continue"])
def test_a_pre_cfg_function_that_replaces_x_before_freefuses_does_not_hide_the_main_evaluation(flux, schedule):
    """ControlNet's inpaint preprocessor (a pre-CFG function of a script that runs before FreeFuse) returns a new
    x every step: the step is still the generation's own, so masks are still found."""
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    earlier = both.clone()

    def replaces_x(model, cond, uncond, x, timestep, model_options):
        return model, cond, uncond, x * 1.0, timestep, model_options  # a new tensor, same values

    earlier.add_sampler_pre_cfg_function(replaces_x)
    runner = Runner(harness, _settings(schedule=schedule, capture_step=1), [loras["A"], loras["B"]])
    runner.sample(earlier, seed=8, steps=3)
    assert runner.session.masks is not None and not runner.session.messages
