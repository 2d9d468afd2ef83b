"""FreeFuse's FLUX behaviour inside Forge, written once and run against both harnesses.

``tests/forge_standin`` (CI) and ``tests/forge`` (a real Forge checkout) import these tests; each provides a
``harness`` fixture (see ``tests/forge_standin/harness.py``). Subject LoRAs are A and B; C is a third,
non-subject LoRA. Text positions: A's trigger tokens 1-2, B's 4-5 of an 8-token prompt.
"""

from __future__ import annotations

import pytest
import torch

from freefuse.forge import session as sessions
from freefuse.forge.session import Plan, Session, SubjectSpec
from freefuse.partition import SubjectMasks
from freefuse.settings import FreeFuseSettings

POSITIONS = {"A": [1, 2], "B": [4, 5]}
TOL = dict(rtol=1e-4, atol=1e-5)


def _settings(**changes) -> FreeFuseSettings:
    base = dict(enabled=True, capture_block=1, capture_step=1, attention_bias=False, token_exclusion=False)
    base.update(changes)
    return FreeFuseSettings.defaults("flux").replace(**base)


def _masks(grid_hw, images, kinds) -> SubjectMasks:
    """Planted masks on the token grid: "ones", "zeros", "left", "right" per subject."""
    h, w = grid_hw
    planes = []
    for kind in kinds:
        plane = torch.zeros(h, w)
        if kind == "ones":
            plane[:] = 1
        elif kind == "left":
            plane[:, : w // 2] = 1
        elif kind == "right":
            plane[:, w // 2 :] = 1
        planes.append(plane)
    masks = torch.stack(planes).unsqueeze(0).repeat(images, 1, 1, 1)
    return SubjectMasks(masks=masks, background=(1 - masks.amax(1)).clamp(0, 1))


def _image_only(lora):
    """The same LoRA restricted to image-stream layers (a subject whose effect is purely spatial)."""
    kept = {k: v for k, v in lora.state_dict.items() if "img_attn" in k or "img_mlp" in k}
    return type(lora)(filename=lora.filename, name=lora.name, state_dict=kept)


class Runner:
    """Sample once with FreeFuse installed through ``before_sampling``, the way the script does it."""

    def __init__(
        self, harness, settings, subjects, masks=None, keep_open=False, grid_of=None, bias_form=None, layout=None,
        styles=(),
    ):  # fmt: skip
        self.harness, self.settings, self.subjects, self.layout = harness, settings, subjects, layout
        self.styles = [SubjectSpec(lora.name, lora.filename, "", []) for lora in styles]
        self.grid_of = grid_of or (lambda x: ((x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2))  # FLUX tokens
        self.masks, self.keep_open, self.bias_form = masks, keep_open, bias_form
        self.session: Session | None = None
        self.calls: list[tuple[int, str]] = []
        self.grids: list[tuple[int, int]] = []  # the token grid of each model call
        self.spies: list = []  # the test's own hook handles, removed after sampling

    def before_sampling(self, unet, sigmas, x, cond, uncond):
        images = x.shape[0]
        grid = self.grid_of(x)
        masks = _masks(grid, images, self.masks) if isinstance(self.masks, tuple) else self.masks
        plan = Plan(
            settings=self.settings,
            subjects=[SubjectSpec(lora.name, lora.filename, lora.name, POSITIONS[lora.name]) for lora in self.subjects],
            background_positions=None,
            n_txt_cond=cond_length(cond),
            sigmas=sigmas,
            masks=masks,
            layout=self.layout,
            styles=self.styles,
        )
        self.session = Session(plan)
        if self.bias_form is not None:
            self.session.bias.form = self.bias_form
        patched = self.session.install(unet)
        assert patched is not unet, self.session.messages
        dm = patched.model.diffusion_model
        self.spies.append(dm.register_forward_pre_hook(self._record, with_kwargs=True))  # after FreeFuse's
        return patched

    def _record(self, module, args, kwargs):
        call = self.session.call if self.session is not None else None
        if call is not None and self.session.open:
            self.calls.append((call.step, call.mode))
            self.grids.append(tuple(call.grid_hw))

    def sample(self, unet, **kw):
        try:
            return self.harness.sample(unet, before_sampling=self.before_sampling, **kw)
        finally:
            self.remove_spies()
            if not self.keep_open:
                sessions.close_active()

    def remove_spies(self):
        for handle in self.spies:
            handle.remove()
        self.spies.clear()


def cond_length(cond) -> int:
    first = cond[0] if isinstance(cond, (list, tuple)) else cond
    if isinstance(first, dict):
        for key in ("crossattn", "c_crossattn", "cross_attn"):
            if key in first:
                return first[key].shape[1]
        model_conds = first.get("model_conds", {})
        if "c_crossattn" in model_conds:
            return model_conds["c_crossattn"].cond.shape[1]
    return 8


@pytest.fixture
def flux(harness):
    unet = harness.make_flux_unet(seed=0)
    loras = {n: harness.make_lora(unet, name=n, seed=i + 1) for i, n in enumerate("ABC")}
    return harness, unet, loras


def _clean_hooks(unet):
    dm = unet.model.diffusion_model
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in dm.modules())


# ---------------------------------------------------------------------- equivalences
def test_all_ones_masks_equal_the_loras_merged(flux):
    harness, unet, loras = flux
    merged = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 0.8)])
    reference = harness.sample(merged, seed=3)
    runner = Runner(harness, _settings(), [loras["A"], loras["B"]], masks=("ones", "ones"))
    out = runner.sample(merged, seed=3)
    torch.testing.assert_close(out, reference, **TOL)
    assert runner.calls and all(mode == "masked" for _, mode in runner.calls)


def test_a_zero_mask_equals_generating_without_that_lora(flux):
    harness, unet, loras = flux
    a, b = _image_only(loras["A"]), _image_only(loras["B"])
    without_b = harness.sample(harness.add_loras(unet, [(a, 1.0)]), seed=4)
    both = harness.add_loras(unet, [(a, 1.0), (b, 1.0)])
    out = Runner(harness, _settings(), [a, b], masks=("ones", "zeros")).sample(both, seed=4)
    torch.testing.assert_close(out, without_b, **TOL)
    assert not torch.allclose(harness.sample(both, seed=4), without_b, **TOL)


def test_planted_masks_change_only_their_regions_lora_contribution(flux):
    harness, unet, loras = flux
    a, b = _image_only(loras["A"]), _image_only(loras["B"])
    both = harness.add_loras(unet, [(a, 1.0), (b, 1.0)])
    seen = {}

    def spy(module, args, output):
        seen.setdefault("x", args[0].detach().clone())
        seen.setdefault("out", output.detach().clone())

    def before(unet_, sigmas, x, cond, uncond):
        patched = runner.before_sampling(unet_, sigmas, x, cond, uncond)
        runner.spies.append(patched.model.diffusion_model.double_blocks[0].img_attn.qkv.register_forward_hook(spy))
        return patched

    runner = Runner(harness, _settings(), [a, b], masks=("left", "right"))
    try:
        harness.sample(both, seed=5, steps=1, before_sampling=before)
    finally:
        runner.remove_spies()
        sessions.close_active()
    module = unet.model.diffusion_model.double_blocks[0].img_attn.qkv
    base = torch.nn.functional.linear(seen["x"], harness.merged_weight(unet, _key(0)), _bias(module))
    delta = {n: _kohya_delta(lora, "lora_unet_double_blocks_0_img_attn_qkv") for n, lora in (("A", a), ("B", b))}
    grid_w = seen["x"].shape[1] and int(round(seen["x"].shape[1] ** 0.5))
    left = (torch.arange(seen["x"].shape[1]) % grid_w) < grid_w // 2
    expected = base + torch.where(left[None, :, None], seen["x"] @ delta["A"].T, seen["x"] @ delta["B"].T)
    torch.testing.assert_close(seen["out"], expected, **TOL)


def _key(block: int) -> str:
    return f"diffusion_model.double_blocks.{block}.img_attn.qkv.weight"


def _bias(module):
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().float()


def _kohya_delta(lora, prefix: str) -> torch.Tensor:
    sd = lora.state_dict
    down, up = sd[f"{prefix}.lora_down.weight"].float(), sd[f"{prefix}.lora_up.weight"].float()
    alpha = float(sd.get(f"{prefix}.alpha", torch.tensor(down.shape[0])))
    return up @ down * (alpha / down.shape[0])


# ---------------------------------------------------------------------- schedules
def test_restart_captures_after_extra_evaluations_with_subject_loras_off(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    runner = Runner(harness, _settings(schedule="restart", capture_step=2), [loras["A"], loras["B"]])
    out = runner.sample(both, seed=6, steps=4)
    phase1 = [c for c in runner.calls if c[1] == "off"]
    assert [step for step, _ in phase1] == [0, 1, 2]
    assert [mode for _, mode in runner.calls[3:]] == ["masked"] * 4
    assert [step for step, _ in runner.calls[3:]] == [0, 1, 2, 3]
    assert runner.session.masks is not None and runner.session.masks.masks.shape[:2] == (1, 2)
    assert torch.isfinite(out).all()


def test_continue_captures_during_sampling_and_masks_from_the_next_step(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    runner = Runner(harness, _settings(schedule="continue", capture_step=1), [loras["A"], loras["B"]])
    runner.sample(both, seed=7, steps=4)
    assert runner.calls == [(0, "full"), (1, "full"), (2, "masked"), (3, "masked")]
    assert runner.session.masks is not None


@pytest.mark.parametrize("method", ["official", "paper"])
def test_cfg_and_batch_two_give_one_mask_set_per_image(flux, method):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    settings = _settings(mask_method=method, attention_bias=True, token_exclusion=True)
    runner = Runner(harness, settings, [loras["A"], loras["B"]])
    out = runner.sample(both, seed=8, steps=3, cfg=2.0, batch=2)
    masks = runner.session.masks
    assert masks is not None, runner.session.messages
    assert masks.masks.shape[:2] == (2, 2)
    assert bool(((masks.masks == 0) | (masks.masks == 1)).all())
    assert torch.isfinite(out).all()


def test_attention_bias_and_token_exclusion_change_the_image(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    plain = Runner(harness, _settings(), [loras["A"], loras["B"]], masks=("left", "right")).sample(both, seed=9)
    biased = Runner(harness, _settings(attention_bias=True), [loras["A"], loras["B"]], masks=("left", "right"))
    out = biased.sample(both, seed=9)
    assert not torch.allclose(out, plain, **TOL)


# ---------------------------------------------------------------------- nothing stays patched
def test_no_hook_or_patch_survives_a_run(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    before = harness.sample(both, seed=10)
    hooks_before = _clean_hooks(unet)
    attention = harness.flux_module.attention
    Runner(harness, _settings(schedule="continue", attention_bias=True), [loras["A"], loras["B"]]).sample(both, seed=10)
    assert sessions.active() is None
    assert harness.flux_module.attention is attention
    assert _clean_hooks(unet) == hooks_before
    torch.testing.assert_close(harness.sample(both, seed=10), before, rtol=0, atol=0)


def test_a_run_that_raises_mid_sampling_leaves_nothing_behind_once_closed(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    before = harness.sample(both, seed=11)
    attention = harness.flux_module.attention
    runner = Runner(harness, _settings(attention_bias=True), [loras["A"], loras["B"]], keep_open=True)
    with pytest.raises(RuntimeError, match="interrupted"):
        harness.sample(both, seed=11, before_sampling=runner.before_sampling, raise_at_step=1)
    assert sessions.active() is runner.session  # Forge skips postprocess after an exception ...
    runner.remove_spies()
    sessions.close_active("next generation")  # ... so the next process() closes it
    assert harness.flux_module.attention is attention
    torch.testing.assert_close(harness.sample(both, seed=11), before, rtol=0, atol=0)


def test_a_third_non_subject_lora_stays_merged_while_subjects_run_at_runtime(flux):
    harness, unet, loras = flux
    three = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0), (loras["C"], 0.7)])
    only_c = harness.add_loras(unet, [(loras["C"], 0.7)])
    harness.sample(only_c, seed=12, steps=1)
    expected_weight = harness.merged_weight(unet, _key(0)).clone()

    seen = {}

    def before(unet_, sigmas, x, cond, uncond):
        patched = runner.before_sampling(unet_, sigmas, x, cond, uncond)
        seen["idents"] = [ident[0] for ident in patched.lora_patches]
        return patched

    runner = Runner(harness, _settings(), [loras["A"], loras["B"]], masks=("ones", "ones"))
    try:
        out = harness.sample(three, seed=12, before_sampling=before)
        seen["weight"] = harness.merged_weight(unet, _key(0)).clone()
    finally:
        runner.remove_spies()
        sessions.close_active()
    assert seen["idents"] == [loras["C"].filename]
    torch.testing.assert_close(seen["weight"], expected_weight, rtol=0, atol=0)
    torch.testing.assert_close(out, harness.sample(three, seed=12), **TOL)
    assert set(three.lora_patches) == {
        (loras[n].filename, w, 1.0, False) for n, w in (("A", 1.0), ("B", 1.0), ("C", 0.7))
    }


def test_hires_pass_reuses_masks_resized_to_the_new_grid(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    small = _masks((4, 4), 1, ("left", "right"))
    runner = Runner(harness, _settings(attention_bias=True), [loras["A"], loras["B"]], masks=small, keep_open=True)
    try:
        out = runner.sample(both, seed=13, height=128, width=96)
        assert out.shape[-2:] == (16, 12)
        assert runner.calls and all(mode == "masked" for _, mode in runner.calls)
        assert set(runner.grids) == {(8, 6)}
        resized = runner.session.masks_at((8, 6)).masks
        assert resized.shape[-2:] == (8, 6) and torch.equal(resized[0, 0, :, :3], torch.ones(8, 3))
    finally:
        sessions.close_active()


def test_an_unknown_model_is_refused_with_a_message_and_nothing_installed(flux):
    harness, unet, loras = flux
    clone = unet.clone()
    settings = _settings()
    plan = Plan(
        settings,
        [SubjectSpec("A", "a", "A", [1]), SubjectSpec("B", "b", "B", [2])],
        None,
        8,
        torch.linspace(1, 0, 5),
    )
    session = Session(plan)
    saved = clone.model.diffusion_model
    try:
        clone.model.diffusion_model = torch.nn.Identity()  # e.g. an SD 1.5 UNet or Chroma
        assert session.install(clone) is clone
    finally:
        clone.model.diffusion_model = saved
    assert "neither FLUX nor SDXL-family" in " ".join(session.messages)
    assert sessions.active() is None


def test_capture_step_beyond_the_schedule_is_refused(flux):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    plan = Plan(
        _settings(capture_step=9),
        [SubjectSpec("A", loras["A"].filename, "A", [1]), SubjectSpec("B", loras["B"].filename, "B", [4])],
        None,
        8,
        torch.linspace(1, 0, 5),
    )
    session = Session(plan)
    assert session.install(both) is both
    assert "capture_step 9 is not below the number of steps (4)" in " ".join(session.messages)
    assert sessions.active() is None


def test_capture_reads_the_cond_rows_of_a_cfg_batch(flux):
    """At step 0 the latent is the same with and without CFG, so the cond rows' capture must be too."""
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    captured = {}
    for cfg in (1.0, 3.0):
        runner = Runner(harness, _settings(schedule="continue", capture_step=0), [loras["A"], loras["B"]])
        original = Session.on_capture

        def spy(self, capture, cfg=cfg, original=original):
            captured[cfg] = capture
            return original(self, capture)

        Session.on_capture = spy
        try:
            runner.sample(both, seed=14, steps=2, cfg=cfg, batch=2)
        finally:
            Session.on_capture = original
    assert captured[1.0].q_img.shape[0] == 2 == captured[3.0].q_img.shape[0]
    torch.testing.assert_close(captured[3.0].q_img, captured[1.0].q_img, **TOL)
    torch.testing.assert_close(captured[3.0].o_img, captured[1.0].o_img, **TOL)
