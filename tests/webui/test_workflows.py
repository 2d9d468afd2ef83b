"""FreeFuse in everyday Forge workflows, through a real Forge over HTTP as a user's client drives it: hires fix,
a failed run followed by other models and tabs, a refiner switch, per-family values and paste-back, a reference
ControlNet, LoRAs Forge did not apply, GGUF and fp8, batches, and every message reaching the API client.

Only this tier runs Forge's own modules/processing.py (hires call order, infotext, paste-back, batches).
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest

from freefuse.script_args import positional_args, positional_names
from freefuse.settings import FreeFuseSettings
from tests.webui.payloads import (
    FLUX_SUBJECTS_PROMPT,
    FLUX_TXT2IMG,
    FP8,
    FP16_LORA,
    GGUF_MODULES,
    SDXL_SUBJECTS_PROMPT,
    SDXL_TXT2IMG,
    fail_at_step,
    freefuse,
    pixels,
)

pytestmark = pytest.mark.slow
FAMILIES = [("flux_a", FLUX_TXT2IMG, FLUX_SUBJECTS_PROMPT), ("sdxl_a", SDXL_TXT2IMG, SDXL_SUBJECTS_PROMPT)]
HIRES = {
    "enable_hr": True,
    "hr_scale": 2,
    "hr_upscaler": "Latent",
    "denoising_strength": 0.6,
    "hr_second_pass_steps": 4,
}


def entry(infotext: str, key: str) -> str | None:
    """One entry of an infotext's parameter line, unquoted as Forge's paste-back reads it."""
    line = infotext.splitlines()[-1]
    found = re.search(rf'(?:^|, ){re.escape(key)}: ("(?:\\.|[^\\"])*"|[^,]*)', line)
    if found is None:
        return None
    value = found.group(1)
    return value[1:-1].replace('\\"', '"').replace("\\\\", "\\") if value.startswith('"') else value


def notes(result, index=0) -> str:
    return entry(result.infotexts[index], "FreeFuse notes") or ""


def same(a, b) -> bool:
    """Pixel-equal images (PIL images or PNG files)."""
    from PIL import Image

    a, b = (Image.open(x) if not hasattr(x, "convert") else x for x in (a, b))
    return np.array_equal(pixels(a), pixels(b))


# ---------------------------------------------------------------------- the plain FreeFuse run, both API forms
@pytest.mark.parametrize(("checkpoint", "payload", "prompt"), FAMILIES)
def test_the_dict_and_the_positional_forms_give_the_same_image(webui, checkpoint, payload, prompt):
    webui.select_model(checkpoint)
    family = "flux" if checkpoint.startswith("flux") else "sdxl"
    subjects = "harry: harry\ndaiyu: daiyu" if family == "flux" else "asuka: asuka\nrei: rei"
    named = webui.txt2img({**payload, "prompt": prompt, "alwayson_scripts": freefuse(subjects=subjects)})
    chosen = FreeFuseSettings.defaults(family).replace(enabled=True, subjects=subjects)
    positional = positional_args(chosen, family)
    listed = webui.txt2img({**payload, "prompt": prompt, "alwayson_scripts": {"FreeFuse": {"args": positional}}})
    assert same(named.images[0], listed.images[0]) and same(named.images[1], listed.images[1])
    assert notes(named) == "" and entry(named.infotexts[0], "FreeFuse").startswith(f"family={family}; subjects=")
    assert re.fullmatch(r"\w+: \w+ \d+%, \w+: \w+ \d+%", entry(named.infotexts[0], "FreeFuse subjects"))


# ---------------------------------------------------------------------- hires fix (item 1)
@pytest.mark.parametrize(("checkpoint", "payload", "prompt"), FAMILIES)
def test_hires_fix_runs_freefuse_in_both_passes(webui, checkpoint, payload, prompt):
    webui.select_model(checkpoint)
    result = webui.txt2img({**payload, **HIRES, "prompt": prompt, "alwayson_scripts": freefuse()})
    assert notes(result) == "", notes(result)  # was: "no weights for this model's denoiser", "no masks"
    assert len(result.images) == 2 and result.images[0].size == (128, 128)
    assert result.images[1].size == (128, 128)  # the mask picture, at the final size
    assert entry(result.infotexts[0], "FreeFuse subjects") and entry(result.infotexts[0], "FreeFuse")
    plain = webui.txt2img({**payload, **HIRES, "prompt": prompt})
    assert not same(plain.images[0], result.images[0])


def test_a_hires_prompt_with_other_subjects_says_so(webui):
    webui.select_model("flux_a")
    body = {**FLUX_TXT2IMG, **HIRES, "prompt": FLUX_SUBJECTS_PROMPT, "hr_prompt": "<lora:harry:1> photo of harry"}
    result = webui.txt2img({**body, "alwayson_scripts": freefuse()})
    assert "the hires prompt has other subjects" in notes(result) or "found 1" in notes(result)
    assert len(result.images) == 2


# ---------------------------------------------------------------------- a failed run, then anything else (item 2)
def _img2img(webui, source):
    body = {**FLUX_TXT2IMG, "prompt": "photo of harry", "init_images": [source], "denoising_strength": 0.6}
    return webui.img2img(body).images[0]


def test_after_a_failed_freefuse_run_every_next_generation_is_bit_identical_to_a_clean_one(webui):
    """A FreeFuse run that raises never reaches postprocess; whatever runs next, in any tab, on any model, must
    be exactly what it is without the failed run. (Forge's first img2img after a checkpoint switch differs from
    later ones, so each reference is taken in the same position as its counterpart after a failure.)"""
    failing = {**FLUX_TXT2IMG, "prompt": FLUX_SUBJECTS_PROMPT, "alwayson_scripts": {**freefuse(), **fail_at_step(2)}}
    plain = {**FLUX_TXT2IMG, "prompt": FLUX_SUBJECTS_PROMPT}
    webui.select_model("flux_a")
    source = webui.txt2img(plain).images[0]
    _img2img(webui, source)
    clean_img2img = _img2img(webui, source)
    webui.select_model("flux_b")
    clean_other_img2img = _img2img(webui, source)  # the first img2img after switching from flux_a
    clean_other = webui.txt2img({**FLUX_TXT2IMG, "prompt": "photo of harry"}).images[0]
    webui.select_model("sdxl_a")
    clean_sdxl = webui.txt2img({**SDXL_TXT2IMG, "prompt": "photo of harry"}).images[0]

    webui.select_model("flux_a")
    _img2img(webui, source)
    assert webui.txt2img(failing, check=False).status == 500
    assert same(_img2img(webui, source), clean_img2img)  # another tab, the same model
    assert webui.txt2img(failing, check=False).status == 500
    assert same(webui.txt2img(plain).images[0], source)  # the same tab and model
    assert webui.txt2img(failing, check=False).status == 500
    webui.select_model("flux_b")  # another checkpoint with other widths, in img2img (FreeFuse not enabled there)
    assert same(_img2img(webui, source), clean_other_img2img)
    assert same(webui.txt2img({**FLUX_TXT2IMG, "prompt": "photo of harry"}).images[0], clean_other)
    webui.select_model("flux_a")
    assert webui.txt2img(failing, check=False).status == 500
    webui.select_model("sdxl_a")  # another family
    assert same(webui.txt2img({**SDXL_TXT2IMG, "prompt": "photo of harry"}).images[0], clean_sdxl)


# ---------------------------------------------------------------------- a refiner switch (item 3)
def test_a_refiner_switch_stops_freefuse_with_a_message_and_no_stale_bias(webui):
    webui.select_model("flux_a")
    body = {**FLUX_TXT2IMG, "prompt": FLUX_SUBJECTS_PROMPT, "refiner_checkpoint": "flux_c", "refiner_switch_at": 0.5}
    result = webui.txt2img({**body, "alwayson_scripts": freefuse()})
    assert "the model changed during sampling at step 3" in notes(result) and "stopped" in notes(result)
    assert len(result.images) == 2 and "Refiner: flux_c" in result.infotexts[0]
    again = webui.txt2img({**body, "alwayson_scripts": freefuse()})
    assert same(again.images[0], result.images[0])  # nothing of the first run's session stayed behind


# ---------------------------------------------------------------------- per-family values, paste-back (item 4)
def test_sdxl_values_equal_to_flux_defaults_are_used_and_a_pasted_infotext_reproduces_the_image(webui):
    webui.select_model("sdxl_a")
    flux = FreeFuseSettings.defaults("flux")
    chosen = FreeFuseSettings.defaults("sdxl").replace(
        enabled=True, morphology=True, eos_background=True, temperature=flux.temperature, capture_step=4
    )
    args = positional_args(chosen, "sdxl")  # the accordion, "Values for: SDXL"
    body = {**SDXL_TXT2IMG, "prompt": SDXL_SUBJECTS_PROMPT}
    first = webui.txt2img({**body, "alwayson_scripts": {"FreeFuse": {"args": args}}})
    recorded = entry(first.infotexts[0], "FreeFuse")
    assert recorded == "family=sdxl; capture_step=4; temperature=4000.0; eos_background=true; morphology=true"
    assert notes(first) == ""
    saved = webui.png_info(first.png[0])
    assert entry(saved["info"], "FreeFuse") == recorded and saved["parameters"]["FreeFuse"] == recorded
    # Forge's paste-back fills the accordion (its API fails on its own list-typed fields unless they are set)
    lists = {"styles": [], "hr_additional_modules": ["Use same choices"]}
    pasted = webui.txt2img({**body, **lists, "infotext": saved["info"]})
    assert entry(pasted.infotexts[0], "FreeFuse") == recorded + "; masks_from=image"  # the PNG's masks, locked
    assert same(pasted.images[0], first.images[0])


def test_flux_values_on_an_sdxl_model_take_its_defaults_and_say_which(webui):
    webui.select_model("sdxl_a")
    cut = positional_names().index("values_for")  # a call written for 0.1: no "Values for"
    old_call = positional_args(FreeFuseSettings.defaults("flux").replace(enabled=True), "flux")[:cut]
    result = webui.txt2img(
        {**SDXL_TXT2IMG, "prompt": SDXL_SUBJECTS_PROMPT, "alwayson_scripts": {"FreeFuse": {"args": old_call}}}
    )
    assert "the values are set for FLUX but this is an SDXL model: the SDXL defaults are used" in notes(result)
    assert entry(result.infotexts[0], "FreeFuse") == "family=sdxl"


# ---------------------------------------------------------------------- reference ControlNet (item 5)
def _png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("schedule", ["restart", "continue"])
@pytest.mark.parametrize(("checkpoint", "payload", "prompt"), FAMILIES)
def test_a_reference_controlnet_never_gives_the_masks(webui, schedule, checkpoint, payload, prompt):
    """reference_only evaluates the model on a noised reference latent before each step's own evaluation; the
    masks (and so, on FLUX where reference_only has no other hook, the image) must not change."""
    webui.select_model(checkpoint)
    base = {**payload, "width": 128, "height": 128, "prompt": prompt}
    reference = webui.txt2img({**base, "prompt": "photo", "seed": 7}).images[0]
    unit = {"enabled": True, "module": "reference_only", "model": "None", "image": _png_b64(reference), "weight": 1.0}
    settings = freefuse(schedule=schedule, capture_step=2)
    alone = webui.txt2img({**base, "alwayson_scripts": settings})
    with_reference = webui.txt2img({**base, "alwayson_scripts": {**settings, "ControlNet": {"args": [unit]}}})
    assert 'ControlNet 0: "Module: reference_only' in with_reference.infotexts[0]
    mask_picture = alone.images[1]
    assert any(same(mask_picture, image) for image in with_reference.images[1:])  # after ControlNet's own picture
    if checkpoint.startswith("flux"):
        assert same(alone.images[0], with_reference.images[0])


# ---------------------------------------------------------------------- LoRAs Forge did not apply (item 6)
@pytest.mark.parametrize(("lora", "word"), [("asuka", "asuka"), ("clip_l_te", "clip")])
def test_a_lora_without_denoiser_weights_is_left_to_forge_and_the_others_run(webui, lora, word):
    webui.select_model("flux_a")
    prompt = f"<lora:harry:1> <lora:daiyu:1> <lora:{lora}:1> photo of harry and daiyu with {word}"
    result = webui.txt2img({**FLUX_TXT2IMG, "prompt": prompt, "alwayson_scripts": freefuse()})
    assert f"LoRA '{lora}' is not a subject: Forge applied none of its weights" in notes(result)
    subjects = entry(result.infotexts[0], "FreeFuse subjects")
    assert subjects.startswith("harry: harry") and "daiyu: daiyu" in subjects and lora not in subjects
    assert len(result.images) == 2


# ---------------------------------------------------------------------- infotext and names (item 7)
def test_no_freefuse_entry_when_it_did_not_run_and_the_reason_in_the_notes(webui):
    webui.select_model("flux_a")
    result = webui.txt2img({**FLUX_TXT2IMG, "prompt": "<lora:harry:1> photo of harry", "alwayson_scripts": freefuse()})
    assert entry(result.infotexts[0], "FreeFuse") is None and entry(result.infotexts[0], "FreeFuse subjects") is None
    assert "needs at least two subject LoRAs" in notes(result)
    assert len(result.images) == 1


def test_batches_and_iterations_get_their_own_subjects_and_the_grid_the_first_images(webui):
    webui.select_model("flux_a")
    body = {**FLUX_TXT2IMG, "prompt": FLUX_SUBJECTS_PROMPT, "batch_size": 2, "n_iter": 2}
    result = webui.txt2img({**body, "alwayson_scripts": freefuse()})
    assert len(result.images) == 8  # four images, four mask pictures
    lines = [entry(text, "FreeFuse subjects") for text in result.infotexts[:4]]
    assert all(lines) and notes(result) == ""


def test_a_style_lora_named_like_a_prompt_word_stays_global_once_subjects_are_named(webui):
    webui.select_model("flux_a")
    prompt = "<lora:harry:1> <lora:daiyu:1> <lora:watercolor:1> watercolor painting of harry and daiyu"
    named = webui.txt2img(
        {**FLUX_TXT2IMG, "prompt": prompt, "alwayson_scripts": freefuse(subjects="harry: harry\ndaiyu: daiyu")}
    )
    subjects = entry(named.infotexts[0], "FreeFuse subjects")
    assert "watercolor" not in subjects and "LoRA 'watercolor' stays global" in notes(named)
    guessed = webui.txt2img({**FLUX_TXT2IMG, "prompt": prompt, "alwayson_scripts": freefuse()})
    assert "'harry', 'daiyu', 'watercolor' are subjects because the LoRA's name is a word" in notes(guessed)
    assert "Subjects box" in notes(guessed)


# ---------------------------------------------------------------------- messages for API clients (item 8)
@pytest.mark.parametrize(
    ("checkpoint", "payload", "settings", "prompt", "said"),
    [
        ("sdxl_a", SDXL_TXT2IMG, {"capture_block": 7}, SDXL_SUBJECTS_PROMPT, "capture_block 7 does not exist"),
        ("flux_a", FLUX_TXT2IMG, {"capture_step": 6}, FLUX_SUBJECTS_PROMPT, "capture_step 6 is not below the number"),
        ("flux_a", FLUX_TXT2IMG, {"tempurature": 3}, FLUX_SUBJECTS_PROMPT, "did you mean 'temperature'"),
        ("flux_a", FLUX_TXT2IMG, {}, "<lora:harry:1> <lora:daiyu:1> a cat", "stays global: none of its trigger"),
        (
            "flux_a",
            FLUX_TXT2IMG,
            {},
            "<lora:nobody:1> " + FLUX_SUBJECTS_PROMPT,
            "'nobody' in the prompt was not loaded",
        ),
        ("flux_a", FLUX_TXT2IMG, {}, "<lora:harry:1> <lora:daiyu:1> harry AND daiyu", "uses AND"),
    ],
)
def test_every_message_reaches_the_api_client_and_the_png(webui, checkpoint, payload, settings, prompt, said):
    webui.select_model(checkpoint)
    result = webui.txt2img({**payload, "prompt": prompt, "alwayson_scripts": freefuse(**settings)})
    assert len(result.images) >= 1
    assert said in notes(result), result.infotexts[0]
    assert said in (result.extra_generation_params.get("FreeFuse notes") or "")
    saved = webui.png_info(result.png[0])
    assert said in (entry(saved["info"], "FreeFuse notes") or "") and said in saved["parameters"]["FreeFuse notes"]


# ---------------------------------------------------------------------- GGUF and fp8 (item 9)
@pytest.mark.parametrize("checkpoint", ["flux_a_Q8_0", "flux_a_Q4_0", "flux_a_Q4_K"])
def test_freefuse_runs_on_a_gguf_flux(webui, checkpoint):
    low_bits = FP16_LORA if checkpoint.endswith("_K") else "Automatic"
    webui.select_model(checkpoint, GGUF_MODULES, unet_storage_dtype=low_bits)
    try:
        for schedule in ("restart", "continue"):
            result = webui.txt2img(
                {**FLUX_TXT2IMG, "prompt": FLUX_SUBJECTS_PROMPT, "alwayson_scripts": freefuse(schedule=schedule)}
            )
            assert len(result.images) == 2 and notes(result) == "", notes(result)
            assert entry(result.infotexts[0], "FreeFuse subjects")
    finally:
        webui.select_model("flux_a")


def test_freefuse_runs_with_fp8_storage(webui):
    webui.select_model("flux_a", unet_storage_dtype=FP8)
    try:
        result = webui.txt2img({**FLUX_TXT2IMG, "prompt": FLUX_SUBJECTS_PROMPT, "alwayson_scripts": freefuse()})
        assert len(result.images) == 2 and notes(result) == "", notes(result)
        assert f"Diffusion in Low Bits: {FP8}" in result.infotexts[0]
    finally:
        webui.select_model("flux_a")


# ---------------------------------------------------------------------- the mask picture can be kept
def test_the_mask_picture_is_saved_beside_the_saved_image(webui, tmp_path):
    webui.select_model("flux_a")
    webui.set_options(samples_save=True, outdir_txt2img_samples=str(tmp_path))
    try:
        body = {**FLUX_TXT2IMG, "prompt": FLUX_SUBJECTS_PROMPT, "save_images": True}
        result = webui.txt2img({**body, "alwayson_scripts": freefuse(save_mask_picture=True)})
        shown_only = webui.txt2img({**body, "seed": 2, "alwayson_scripts": freefuse()})
    finally:
        webui.set_options(samples_save=False)
    saved = sorted(tmp_path.rglob("*.png"))
    pictures = [path for path in saved if path.name.endswith("-freefuse-masks.png")]
    assert len(pictures) == 1 and len(saved) == 3, saved  # two images, one picture: only where asked
    image = pictures[0].with_name(pictures[0].name.replace("-freefuse-masks.png", ".png"))
    assert image in saved and same(pictures[0], result.images[1])  # the picture the API returned, named after it
    assert len(shown_only.images) == 2
