"""Smoke tests of the webui harness itself: the tiny models load and generate reproducibly, LoRAs act,
FreeFuse answers through the API, the failure extension fails a generation, GGUF and fp8 load."""

from __future__ import annotations

import numpy as np
import pytest

from tests.webui.client import WebuiError
from tests.webui.payloads import (
    FLUX_CHECKPOINTS,
    FLUX_STYLE_LORAS,
    FLUX_SUBJECT_LORAS,
    FLUX_SUBJECTS_PROMPT,
    FLUX_TXT2IMG,
    FP8,
    FP16_LORA,
    GGUF_CHECKPOINTS,
    GGUF_MODULES,
    SDXL_CHECKPOINTS,
    SDXL_STYLE_LORAS,
    SDXL_SUBJECT_LORAS,
    SDXL_SUBJECTS_PROMPT,
    SDXL_TXT2IMG,
    TEXT_ENCODER_LORAS,
    fail_at_step,
    freefuse,
    mean_abs_diff,
    pixels,
)

pytestmark = pytest.mark.slow


def _image(webui, payload):
    result = webui.txt2img(payload)
    assert len(result.images) == 1, result.infotexts
    return result.images[0]


def test_the_tiny_models_and_loras_are_listed(webui):
    assert set(FLUX_CHECKPOINTS + SDXL_CHECKPOINTS + GGUF_CHECKPOINTS) <= set(webui.checkpoints())
    assert set(GGUF_MODULES) <= set(webui.modules())
    loras = FLUX_SUBJECT_LORAS + FLUX_STYLE_LORAS + SDXL_SUBJECT_LORAS + SDXL_STYLE_LORAS + TEXT_ENCODER_LORAS
    assert set(loras) <= set(webui.loras())
    scripts = webui.scripts()["txt2img"]
    assert "freefuse" in scripts and "freefuse test failure" in scripts


@pytest.mark.parametrize(("checkpoint", "payload"), [("flux_a", FLUX_TXT2IMG), ("sdxl_a", SDXL_TXT2IMG)])
def test_same_seed_gives_the_same_image(webui, checkpoint, payload):
    webui.select_model(checkpoint)
    first = webui.txt2img({**payload, "prompt": "photo of harry and daiyu"})
    second = webui.txt2img({**payload, "prompt": "photo of harry and daiyu"})
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
    assert pixels(first.images[0]).std() > 5, "a flat image: the tiny model carries no signal"
    assert f"Model: {checkpoint}," in first.infotexts[0]
    other_seed = _image(webui, {**payload, "prompt": "photo of harry and daiyu", "seed": 2})
    assert mean_abs_diff(first.images[0], other_seed) > 1


@pytest.mark.parametrize(
    ("a", "b", "payload"), [("flux_a", "flux_b", FLUX_TXT2IMG), ("sdxl_a", "sdxl_b", SDXL_TXT2IMG)]
)
def test_the_b_checkpoint_differs(webui, a, b, payload):
    images = {}
    for name in (a, b, a):  # and back: nothing of b stays behind
        webui.select_model(name)
        images.setdefault(name, []).append(_image(webui, {**payload, "prompt": "photo"}))
    assert mean_abs_diff(images[a][0], images[b][0]) > 1
    assert np.array_equal(pixels(images[a][0]), pixels(images[a][1]))


@pytest.mark.parametrize(
    ("checkpoint", "payload", "loras"),
    [("flux_a", FLUX_TXT2IMG, FLUX_SUBJECT_LORAS), ("sdxl_a", SDXL_TXT2IMG, SDXL_SUBJECT_LORAS)],
)
def test_each_subject_lora_changes_the_image(webui, checkpoint, payload, loras):
    webui.select_model(checkpoint)
    prompt = "photo of harry and daiyu"
    both = _image(webui, {**payload, "prompt": f"<lora:{loras[0]}:1> <lora:{loras[1]}:1> {prompt}"})
    for kept in loras:
        one = _image(webui, {**payload, "prompt": f"<lora:{kept}:1> {prompt}"})
        assert mean_abs_diff(both, one) > 1, f"removing a LoRA next to {kept} changed nothing"


def test_style_and_text_encoder_loras_apply(webui):
    webui.select_model("flux_a")
    plain = _image(webui, {**FLUX_TXT2IMG, "prompt": "photo of harry"})
    for lora in FLUX_STYLE_LORAS + TEXT_ENCODER_LORAS:
        assert mean_abs_diff(plain, _image(webui, {**FLUX_TXT2IMG, "prompt": f"<lora:{lora}:1> photo of harry"})) > 0


@pytest.mark.parametrize(
    ("checkpoint", "payload", "prompt"),
    [("flux_a", FLUX_TXT2IMG, FLUX_SUBJECTS_PROMPT), ("sdxl_a", SDXL_TXT2IMG, SDXL_SUBJECTS_PROMPT)],
)
def test_freefuse_returns_the_image_masks_and_infotext(webui, checkpoint, payload, prompt):
    webui.select_model(checkpoint)
    result = webui.txt2img({**payload, "prompt": prompt, "alwayson_scripts": freefuse()})
    assert len(result.images) == 2, f"image and mask picture expected: {result.infotexts}"
    assert "FreeFuse" in result.extra_generation_params
    assert "FreeFuse: " in result.infotexts[0]
    assert "not applied" not in result.infotexts[0], result.infotexts[0]
    assert "FreeFuse" in webui.png_info(result.png[0])["parameters"]


def test_img2img_runs(webui):
    webui.select_model("flux_a")
    source = _image(webui, {**FLUX_TXT2IMG, "prompt": "photo of harry"})
    img2img = {**FLUX_TXT2IMG, "prompt": "photo of harry", "init_images": [source], "denoising_strength": 0.6}
    first, second = webui.img2img(img2img), webui.img2img(img2img)  # Forge's first img2img after a model switch
    assert len(second.images) == 1 and second.images[0].size == source.size  # may differ from later ones
    assert mean_abs_diff(second.images[0], webui.img2img(img2img).images[0]) == 0
    assert first.infotexts[0].startswith("photo of harry")


def test_the_failure_extension_fails_the_generation_with_http_500(webui):
    webui.select_model("flux_a")
    result = webui.txt2img({**FLUX_TXT2IMG, "prompt": "photo", "alwayson_scripts": fail_at_step(2)}, check=False)
    assert result.status == 500
    assert "raised at sampling step 2" in result.error
    with pytest.raises(WebuiError, match="HTTP 500"):
        webui.txt2img({**FLUX_TXT2IMG, "prompt": "photo", "alwayson_scripts": fail_at_step(0)})
    off = _image(webui, {**FLUX_TXT2IMG, "prompt": "photo", "alwayson_scripts": fail_at_step(-1)})
    assert np.array_equal(pixels(off), pixels(_image(webui, {**FLUX_TXT2IMG, "prompt": "photo"})))


@pytest.mark.parametrize(
    ("checkpoint", "payload", "prompt"),
    [("flux_a", FLUX_TXT2IMG, FLUX_SUBJECTS_PROMPT), ("sdxl_a", SDXL_TXT2IMG, SDXL_SUBJECTS_PROMPT)],
)
def test_the_failure_extension_fails_a_freefuse_generation_too(webui, checkpoint, payload, prompt):
    """The raising pre-CFG function survives FreeFuse's clone of the unet (FreeFuse runs after it)."""
    webui.select_model(checkpoint)
    scripts = {**freefuse(), **fail_at_step(3)}
    result = webui.txt2img({**payload, "prompt": prompt, "alwayson_scripts": scripts}, check=False)
    assert result.status == 500 and "raised at sampling step 3" in result.error


@pytest.mark.parametrize("checkpoint", GGUF_CHECKPOINTS)
def test_gguf_flux_generates_close_to_flux_a(webui, checkpoint):
    webui.select_model("flux_a")
    reference = _image(webui, {**FLUX_TXT2IMG, "prompt": "photo of harry"})
    low_bits = FP16_LORA if checkpoint.endswith("_K") else "Automatic"  # Forge cannot merge LoRAs into Q4_K
    webui.select_model(checkpoint, GGUF_MODULES, unet_storage_dtype=low_bits)
    result = webui.txt2img({**FLUX_TXT2IMG, "prompt": "<lora:watercolor:0.5> photo of harry"})
    assert f"Model: {checkpoint}," in result.infotexts[0] and "Module 1: flux_vae" in result.infotexts[0]
    plain = _image(webui, {**FLUX_TXT2IMG, "prompt": "photo of harry"})
    assert mean_abs_diff(plain, reference) < 8, "the quantised flux_a should draw nearly flux_a's picture"
    assert mean_abs_diff(plain, result.images[0]) > 0


def test_fp8_storage_loads_flux_a(webui):
    webui.select_model("flux_a")
    reference = _image(webui, {**FLUX_TXT2IMG, "prompt": "photo of harry"})
    webui.select_model("flux_a", unet_storage_dtype=FP8)
    try:
        result = webui.txt2img({**FLUX_TXT2IMG, "prompt": "<lora:harry:1> photo of harry"})
        assert f"Diffusion in Low Bits: {FP8}" in result.infotexts[0]
        plain = _image(webui, {**FLUX_TXT2IMG, "prompt": "photo of harry"})
        assert mean_abs_diff(plain, reference) < 8
    finally:
        webui.select_model("flux_a")
    assert webui.options()["forge_unet_storage_dtype"] == "Automatic"


def test_the_server_did_not_try_the_network(webui_server):
    log = webui_server.log_tail(10**7)
    for sign in ("Downloading", "huggingface.co", "Max retries exceeded", "ConnectionError", "ProxyError"):
        assert sign not in log, f"{sign!r} in {webui_server.log_path}"
