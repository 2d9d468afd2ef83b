"""Latent refinement through a real Forge over HTTP, on the tiny FLUX and SDXL checkpoints: reference images sent
as base64 in the API, the tiny CLIP / DINOv2 folders the test Forge keeps in models/, what ran said in the
response and the PNG, every missing piece one message, and a plain run afterwards unchanged."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.webui.payloads import FLUX_TXT2IMG, SDXL_TXT2IMG, freefuse
from tests.webui.test_workflows import notes, same

pytestmark = pytest.mark.slow
PROMPTS = [
    ("flux_a", FLUX_TXT2IMG, "<lora:harry:1> <lora:daiyu:1> harry and daiyu hugging", "harry"),
    ("sdxl_a", SDXL_TXT2IMG, "<lora:asuka:1> <lora:rei:1> asuka and rei hugging", "asuka"),
]


def _png(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("checkpoint", "payload", "prompt", "subject"), PROMPTS)
def test_refinement_runs_from_base64_references_and_says_what_ran(webui, checkpoint, payload, prompt, subject):
    webui.select_model(checkpoint)
    body = {**payload, "prompt": prompt}
    plain = webui.txt2img(body).images[0]
    alone = webui.txt2img({**body, "alwayson_scripts": freefuse()}).images[0]
    refs = {"style_reference": _png(1), "subject_references": {subject: [_png(2)]}}
    result = webui.txt2img({**body, "alwayson_scripts": freefuse(refine=True, refine_strength=0.2, **refs)})
    said = notes(result)
    assert "latent refinement ran at " in said and f" of {payload['steps']} steps (style by CLIP tiny-clip; " in said
    assert f"{subject} by DINO dinov2-tiny); loss " in said, said
    assert "refine=true" in result.infotexts[0].replace(" ", "").lower()  # the setting is recorded for paste-back
    assert not same(result.images[0], alone)  # the correction changes the picture
    assert same(webui.txt2img(body).images[0], plain)  # nothing of FreeFuse stays behind


def test_each_missing_piece_is_one_message_and_the_image_is_still_generated(webui):
    webui.select_model("flux_a")
    body = {**FLUX_TXT2IMG, "prompt": PROMPTS[0][2]}
    cases = [
        ({}, "no reference image was given"),
        ({"style_reference": "not a picture"}, "style_reference is not an image"),
        ({"style_reference": _png(1), "refine_clip": "ViT-H"}, "refine_clip 'ViT-H' is not in"),
        ({"subject_references": {"nobody": [_png(3)]}}, "subject_references names 'nobody'"),
    ]
    for extra, expected in cases:
        result = webui.txt2img({**body, "alwayson_scripts": freefuse(refine=True, **extra)})
        said = notes(result)
        assert said.count(expected) == 1, said
        assert result.images and "FreeFuse subjects" in result.infotexts[0]  # FreeFuse itself still ran
