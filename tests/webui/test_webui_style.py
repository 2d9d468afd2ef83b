"""Subject + style fusion through a real Forge over HTTP, on the tiny FLUX and SDXL checkpoints: two subjects and a
style, one subject and a style, every selector, the messages, paste-back, and a plain run afterwards."""

from __future__ import annotations

import pytest

from tests.webui.payloads import FLUX_TXT2IMG, SDXL_TXT2IMG, freefuse
from tests.webui.test_workflows import entry, notes, same

pytestmark = pytest.mark.slow
STYLED = [
    (
        "flux_a",
        FLUX_TXT2IMG,
        "<lora:harry:1> <lora:daiyu:1> <lora:watercolor:1> harry and daiyu, watercolor",
        "watercolor",
    ),
    ("sdxl_a", SDXL_TXT2IMG, "<lora:asuka:1> <lora:rei:1> <lora:inkwash:1> asuka and rei, inkwash", "inkwash"),
]


@pytest.mark.parametrize(("checkpoint", "payload", "prompt", "style"), STYLED)
def test_two_subjects_and_a_style_fuse_with_every_selector_and_a_plain_run_after_is_unchanged(
    webui, checkpoint, payload, prompt, style
):
    webui.select_model(checkpoint)
    body = {**payload, "prompt": prompt}
    plain = webui.txt2img(body).images[0]
    images = {}
    for selector in ("kl", "var", "l2", "cos", "klora", "sum"):
        result = webui.txt2img({**body, "alwayson_scripts": freefuse(style_loras=style, style_selector=selector)})
        said = notes(result)
        assert all("always chose" in part for part in said.split(" | ") if part), said
        line = entry(result.infotexts[0], "FreeFuse style")
        assert line.startswith(f"{style} ({selector}): "), line
        assert style not in entry(result.infotexts[0], "FreeFuse subjects")  # a style is never a subject
        images[selector] = result.images[0]
    assert not same(images["kl"], images["sum"])  # the selection changes the picture
    assert same(webui.txt2img(body).images[0], plain)  # nothing of FreeFuse stays behind


@pytest.mark.parametrize(("checkpoint", "payload", "prompt", "style"), STYLED)
def test_one_subject_and_a_style_fuse_over_the_whole_image(webui, checkpoint, payload, prompt, style):
    webui.select_model(checkpoint)
    first = prompt.split()[0]
    single = f"{first} <lora:{style}:1> {prompt.split('> ')[-1]}"
    result = webui.txt2img({**payload, "prompt": single, "alwayson_scripts": freefuse(style_loras=style)})
    subjects = entry(result.infotexts[0], "FreeFuse subjects")
    assert subjects.endswith(" 100%") and "," not in subjects, subjects  # one subject, everywhere
    assert entry(result.infotexts[0], "FreeFuse style").startswith(f"{style} (kl): ")
    mapped = webui.txt2img(
        {**payload, "prompt": single, "alwayson_scripts": freefuse(style_loras=style, style_picture=True)}
    )
    assert len(mapped.images) == len(result.images) + 1  # the style map comes back as one more image
    panel = max(payload["steps"] * 6, 60)  # a 6 px column per step, at least 60 px
    assert mapped.images[-1].width == panel + 2 * 4  # one region: one panel and the margins


def test_style_marks_that_do_not_fit_are_said_and_paste_back_restores_the_style_settings(webui):
    webui.select_model("flux_a")
    checkpoint, payload, prompt, style = STYLED[0]
    body = {**payload, "prompt": prompt}
    result = webui.txt2img(
        {**body, "alwayson_scripts": freefuse(style_loras="watercolor, ghost", style_selector="klora", style_ramp="s")}
    )
    assert "style LoRA 'ghost' is not in the prompt" in notes(result)
    recorded = entry(result.infotexts[0], "FreeFuse")
    assert "style_loras=watercolor%2C ghost" in recorded and "style_selector=klora" in recorded
    lists = {"styles": [], "hr_additional_modules": ["Use same choices"]}
    pasted = webui.txt2img({**body, **lists, "infotext": result.infotexts[0]})
    assert entry(pasted.infotexts[0], "FreeFuse style").startswith("watercolor (klora): ")
    assert same(pasted.images[0], result.images[0])


def test_a_style_without_a_subject_is_said_and_the_image_generated(webui):
    webui.select_model("flux_a")
    body = {**FLUX_TXT2IMG, "prompt": "<lora:watercolor:1> a cat, watercolor"}
    result = webui.txt2img({**body, "alwayson_scripts": freefuse(style_loras="watercolor")})
    assert "style fusion needs a subject LoRA" in notes(result) and len(result.images) == 1
    assert entry(result.infotexts[0], "FreeFuse") is None
