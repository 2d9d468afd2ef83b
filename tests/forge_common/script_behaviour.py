"""The FreeFuse script as Forge drives it: args, process, process_before_every_sampling, postprocess_batch.

Runs against either harness's backend, with the webui side faked (tests/forge_common/fake_webui.py).
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch

from freefuse.forge import session as sessions
from freefuse.script_args import positional_args, positional_names
from freefuse.settings import FreeFuseSettings, setting_names
from tests.forge_common.fake_webui import Processing, T5Engine, installed_webui

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "<lora:A:1> <lora:B:1> photo of harry_potter and daiyu_lin hugging"
N_TXT = 16
ON = {"enabled": True, "capture_block": 1, "capture_step": 1}  # the tiny test model has 3 double blocks


@pytest.fixture
def webui():
    with installed_webui() as state:
        spec = importlib.util.spec_from_file_location("freefuse_script", ROOT / "scripts" / "freefuse.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        state.module = module
        yield state
        sessions.close_active()


@pytest.fixture
def model(harness, webui):
    unet = harness.make_flux_unet(seed=0)
    loras = {n: harness.make_lora(unet, name=n, seed=i + 1) for i, n in enumerate("AB")}
    webui.load_lora("A", loras["A"].filename, activation_text="harry_potter")
    webui.load_lora("B", loras["B"].filename, metadata={"modelspec.trigger_phrase": "daiyu_lin"})
    return unet, harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)]), loras


def generate(
    harness, webui, unet, args, *, prompt=PROMPT, batch=1, cfg=1.0, steps=4, xyz=None, n_txt=N_TXT, api=False, vae=None
):
    """One txt2img job: the callbacks in Forge's order around the harness's sampling."""
    script = webui.module.FreeFuseScript()
    script.ui(False)
    p = Processing(prompt, unet, steps=steps, batch_size=batch, engine=T5Engine(min_length=N_TXT), api=api, vae=vae)
    if xyz:
        p.freefuse_xyz = xyz
    script.process(p, *args)

    def before(unet_, sigmas, x, cond, uncond):
        p._sigmas = sigmas
        p.sd_model.forge_objects.unet = unet_
        script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)
        return p.sd_model.forge_objects.unet

    latent = harness.sample(unet, before_sampling=before, batch=batch, cfg=cfg, steps=steps, n_txt=n_txt, seed=21)
    images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    script.postprocess_batch(p, *args, images=images, batch_number=0)
    p.processed = types.SimpleNamespace(images=[object()] * batch, extra_generation_params=p.extra_generation_params)
    script.postprocess(p, p.processed, *args)
    p.latent = latent
    return p


def entry(p, key, index=0, **where):
    """An infotext entry of image ``index`` as Forge's create_infotext evaluates it (callables get its locals)."""
    value = p.extra_generation_params.get(key)
    if callable(value):
        where = {"all_prompts": p.all_prompts, "use_main_prompt": False, **where}
        return value(p=p, index=index, **where)
    return value


def subjects_line(p, index=0):
    return entry(p, "FreeFuse subjects", index)


def recorded_settings(p, index=0):
    """The FreeFuse infotext entry of image ``index`` read back: the family and the non-default settings."""
    text = entry(p, "FreeFuse", index)
    if text is None:
        return None
    settings, family = FreeFuseSettings.from_infotext(text)
    base = FreeFuseSettings.defaults(family).to_dict()
    return {"family": family, **{k: v for k, v in settings.to_dict().items() if k != "enabled" and base[k] != v}}


def test_ui_returns_one_component_per_setting_in_settings_order(webui):
    script = webui.module.FreeFuseScript()
    components = script.ui(False)
    # every setting, "Values for" after Token exclusion, the layout inputs (drawing, mask images, locked masks)
    # and refinement's reference images (style, subjects)
    assert len(components) == len(setting_names()) + 1 + 3 + 2
    assert components[0].value is False  # the accordion is off by default
    assert [c.value for c in components] == [False, *positional_args(FreeFuseSettings.defaults("flux"), "flux")[1:]]
    assert len(script.infotext_fields) == len(components)
    assert script.show(True) is script.show(False) is webui.module.scripts.AlwaysVisible  # txt2img and img2img


def test_two_subjects_from_the_prompt_get_masks_a_picture_and_infotext(harness, webui, model):
    unet, both, loras = model
    attention = harness.flux_module.attention
    p = generate(harness, webui, both, [ON])
    assert not p.comments, p.comments
    assert len(p.extra_result_images) == 1 and p.extra_result_images[0].size == (64, 64)
    line = subjects_line(p)
    assert line.startswith("A: harry_potter ") and ", B: daiyu_lin " in line and line.endswith("%")
    assert recorded_settings(p) == {
        "family": "flux",
        "capture_block": 1,
        "capture_step": 1,
    }
    assert sessions.active() is None and harness.flux_module.attention is attention


def test_batch_two_with_cfg_gives_a_picture_and_summary_per_image(harness, webui, model):
    unet, both, loras = model
    p = generate(harness, webui, both, [{**ON, "schedule": "continue"}], batch=2, cfg=2.0)
    assert not p.comments, p.comments
    assert len(p.extra_result_images) == 2
    assert subjects_line(p, 0) and subjects_line(p, 1)


def test_one_subject_is_not_enough_and_the_user_is_told(harness, webui, model):
    unet, both, loras = model
    plain = harness.sample(both, n_txt=N_TXT, seed=21)
    p = generate(harness, webui, both, [ON], prompt="<lora:A:1> <lora:B:1> photo of harry_potter alone")
    text = " ".join(p.comments)
    assert "LoRA 'B' stays global" in text and "at least two subject LoRAs" in text
    assert p.extra_result_images == []
    torch.testing.assert_close(p.latent, plain, rtol=0, atol=0)


def test_bad_api_values_turn_freefuse_off_with_one_sentence_each(harness, webui, model):
    unet, both, loras = model
    plain = harness.sample(both, n_txt=N_TXT, seed=21)
    p = generate(harness, webui, both, [{"enabled": True, "tempurature": 1, "top_k_ratio": 3}], api=True)
    text = " ".join(p.comments)
    assert "unknown setting 'tempurature' (did you mean 'temperature'?)" in text
    assert "top_k_ratio must be from 0.01 to 1; got 3" in text  # an API client reads the keys it sent
    torch.testing.assert_close(p.latent, plain, rtol=0, atol=0)


def test_in_the_web_ui_a_bad_value_is_named_by_its_label(harness, webui, model):
    unet, both, loras = model
    args = [True, "", "official", "restart", True, 1, 200]  # Capture step 200: beyond its slider
    p = generate(harness, webui, both, args)
    assert "FreeFuse: not used for this generation: Capture step must be from 0 to 150; got 200" in p.comments


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("<lora:A:1> <lora:B:1> harry_potter AND daiyu_lin", "uses AND"),
        ("<lora:A:1> <lora:B:1> [harry_potter:daiyu_lin:2] and daiyu_lin", "scheduling"),
        ("<lora:A:1> <lora:B:1> harry_potter BREAK daiyu_lin", "BREAK"),
    ],
)
def test_unsupported_prompt_syntax_is_explained_and_the_image_still_generated(harness, webui, model, prompt, reason):
    unet, both, loras = model
    p = generate(harness, webui, both, [ON], prompt=prompt)
    assert reason in " ".join(p.comments)
    assert torch.isfinite(p.latent).all() and sessions.active() is None


def test_a_lora_tag_forge_did_not_load_is_reported(harness, webui, model):
    unet, both, loras = model
    p = generate(harness, webui, both, [ON], prompt="<lora:ghost:1> " + PROMPT)
    assert "LoRA 'ghost' in the prompt was not loaded by Forge" in " ".join(p.comments)
    assert len(p.extra_result_images) == 1  # the two real subjects still work


def test_infotext_paste_back_restores_every_setting(webui):
    script = webui.module.FreeFuseScript()
    script.ui(False)
    chosen = FreeFuseSettings.defaults("flux").replace(enabled=True, mask_method="paper", temperature=300.0)
    params = {"FreeFuse": chosen.to_infotext("flux")}
    restored = dict(zip(positional_names(), (reader(params) for _, reader in script.infotext_fields), strict=True))
    for drawing in ("layout", "layout_masks"):
        assert restored.pop(drawing) is None  # None: Forge leaves the drawing as it is
    assert restored.pop("locked_masks") == ""  # no masks in the pasted text: none stay locked
    expected = dict(zip(positional_names(), positional_args(chosen, "flux"), strict=True))
    assert restored == {k: v for k, v in expected.items() if k in restored}
    assert script.infotext_fields[0][1]({}) is False  # no FreeFuse key: the accordion stays closed


def test_a_pasted_sdxl_infotext_reproduces_its_values_even_where_they_equal_flux_defaults(webui):
    from freefuse.script_args import settings_from_args

    script = webui.module.FreeFuseScript()
    script.ui(False)
    flux = FreeFuseSettings.defaults("flux")
    chosen = FreeFuseSettings.defaults("sdxl").replace(
        enabled=True, morphology=True, capture_step=flux.capture_step, temperature=flux.temperature
    )
    params = {"FreeFuse": chosen.to_infotext("sdxl")}
    restored = [reader(params) for _, reader in script.infotext_fields]
    assert restored[positional_names().index("values_for")] == "sdxl"  # "Values for" follows the recorded family
    parsed = settings_from_args(restored, family="sdxl")
    assert parsed.settings == chosen and parsed.notes == []


def test_switching_values_for_fills_in_that_familys_defaults(webui):
    from freefuse.settings import family_knobs

    script = webui.module.FreeFuseScript()
    components = script.ui(False)
    values_for = components[positional_names().index("values_for")]
    ((event, fill, inputs, outputs),) = values_for.events
    assert event == "input" and inputs == [values_for]  # user input only: a paste-back must not refill
    by_name = dict(zip(setting_names(), components, strict=False))
    assert outputs == [by_name[name] for name in family_knobs()]
    sdxl = FreeFuseSettings.defaults("sdxl")
    assert fill("sdxl") == [getattr(sdxl, name) for name in family_knobs()]


def test_the_accordion_starts_with_sdxl_values_under_forges_xl_preset(webui):
    webui.opts.forge_preset = "xl"
    components = webui.module.FreeFuseScript().ui(False)
    assert [c.value for c in components] == [False, *positional_args(FreeFuseSettings.defaults("sdxl"), "sdxl")[1:]]


def test_xyz_axes_are_offered_and_override_the_ui(harness, webui, model):
    xyz = types.SimpleNamespace(axis_options=[], AxisOptionTxt2Img=lambda label, kind, apply, **kw: (label, apply))
    webui.scripts_data.append(
        types.SimpleNamespace(script_class=type("X", (), {"__module__": "xyz_grid.py"}), module=xyz)
    )
    webui.module._add_xyz_axes()
    labels = [label for label, _ in xyz.axis_options]
    assert "[FreeFuse] Capture step" in labels and "[FreeFuse] Mask method" in labels
    cell = types.SimpleNamespace()
    dict(xyz.axis_options)["[FreeFuse] Capture step"](cell, 2, [1, 2])
    unet, both, loras = model
    p = generate(harness, webui, both, [ON], xyz=cell.freefuse_xyz)
    assert recorded_settings(p)["capture_step"] == 2


def test_script_reload_closes_a_session_left_open(harness, webui, model):
    unet, both, loras = model
    script = webui.module.FreeFuseScript()
    p = Processing(PROMPT, both, engine=T5Engine(min_length=N_TXT))
    script.process(p, ON)
    p._sigmas = torch.linspace(1, 0, 5)
    script.process_before_every_sampling(p, ON)
    assert sessions.active() is not None  # e.g. an interrupted generation never reached postprocess
    for callback in webui.callbacks["script_unloaded"]:
        callback()
    assert sessions.active() is None


# ---------------------------------------------------------------------- SDXL through the script
@pytest.fixture
def sdxl_model(harness, webui):
    unet = harness.make_sdxl_unet(seed=0, transformer_depth_output=(0, 0, 0, 1, 1, 1, 4, 4, 4))
    loras = {n: harness.make_lora(unet, name=n, seed=i + 1) for i, n in enumerate("AB")}
    webui.load_lora("A", loras["A"].filename, activation_text="harry_potter")
    webui.load_lora("B", loras["B"].filename, metadata={"modelspec.trigger_phrase": "daiyu_lin"})
    return unet, harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)]), loras


def test_sdxl_subjects_are_found_on_clip_chunks_and_get_masks(harness, webui, sdxl_model):
    unet, both, loras = sdxl_model
    p = generate(
        harness, webui, both, [ON], prompt=PROMPT.replace("harry_potter", "(harry_potter:1.2)"), cfg=5.0, n_txt=77
    )
    assert not p.comments, p.comments
    assert len(p.extra_result_images) == 1
    assert subjects_line(p).startswith("A: harry_potter ")
    assert recorded_settings(p)["family"] == "sdxl"


def test_sdxl_untouched_ui_values_take_the_sdxl_defaults(harness, webui, sdxl_model):
    unet, both, loras = sdxl_model
    ui = positional_args(FreeFuseSettings.defaults("flux").replace(enabled=True), "flux")
    p = generate(harness, webui, both, ui, cfg=5.0, steps=10, n_txt=77)
    (comment,) = p.comments
    assert "set for FLUX but this is an SDXL model: the SDXL defaults are used" in comment
    assert recorded_settings(p) == {"family": "sdxl"}  # all SDXL defaults
    assert len(p.extra_result_images) == 1
