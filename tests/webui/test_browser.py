"""The FreeFuse accordion in a real browser on the real webui: groups by purpose, the mask method's knobs only,
inputs that step by their own scale, the live subject preview, paste-back, and a bad value's message under the
image. Headless Chromium driven by Playwright (the system's Chromium: nothing downloaded).

Skipped, with the reason, without Playwright or a Chromium (``CHROMIUM`` or chromium on the PATH), and, like the
whole tier, without a Forge checkout.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.webui.payloads import FLUX_SUBJECTS_PROMPT, FLUX_TXT2IMG, SDXL_SUBJECTS_PROMPT, SDXL_TXT2IMG, freefuse

pytestmark = pytest.mark.slow
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ID = "#script_txt2img_freefuse_"  # the txt2img accordion's element ids (img2img has its own, script_img2img_...)


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install playwright)"
    )
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium (apt-get install chromium, or set CHROMIUM=/path/to/chromium)")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


MODELS = {
    "flux_a": (FLUX_TXT2IMG, FLUX_SUBJECTS_PROMPT, "FLUX"),
    "sdxl_a": (SDXL_TXT2IMG, SDXL_SUBJECTS_PROMPT, "SDXL"),
}


@pytest.fixture(params=["flux_a"])
def page(request, browser, webui, webui_server):
    webui.select_model(request.param)
    webui.txt2img({**MODELS[request.param][0], "prompt": "photo"})  # Forge loads a checkpoint at its first generation
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    page.goto(webui_server.url, timeout=120_000)
    page.wait_for_selector("#txt2img_prompt textarea", timeout=120_000)
    yield page
    page.close()


def _open_freefuse(page, advanced=True, tick=True):
    if tick:
        page.locator(f"{ID}enabled-visible-checkbox").check()
    if not page.locator(f"{ID}subjects").is_visible():
        page.locator(f"{ID}enabled > .label-wrap").click(position={"x": 300, "y": 10})  # opens, keeps the tick
    page.locator(f"{ID}subjects").wait_for()
    if advanced and not page.locator(f"{ID}values_for").is_visible():
        page.locator(f"{ID}enabled").get_by_text("Advanced", exact=True).click()
        page.locator(f"{ID}values_for").wait_for()


def _number(page, name):
    return page.locator(f"{ID}{name} input[type=number]")


def test_advanced_is_grouped_and_shows_the_chosen_methods_knobs_only(page):
    _open_freefuse(page)
    for group in ("capture", "official", "background", "bias", "tokens"):
        assert page.locator(f"{ID}group_{group}").is_visible(), group
    assert page.locator(f"{ID}group_paper").is_hidden()
    page.locator(f"{ID}mask_method").get_by_text("paper", exact=True).click()
    page.locator(f"{ID}group_paper").wait_for(state="visible")
    assert page.locator(f"{ID}group_official").is_hidden()
    page.locator(f"{ID}mask_method").get_by_text("official", exact=True).click()
    page.locator(f"{ID}group_official").wait_for(state="visible")
    assert page.locator(f"{ID}group_paper").is_hidden()
    assert page.locator(f"{ID}group_official").get_by_text("Neighbour vote", exact=True).is_visible()  # in words


def test_numbers_step_by_their_own_scale_and_their_defaults_are_valid(page):
    _open_freefuse(page)
    for name, step, value, after_up in (
        ("gravity", "0.000001", "0.00004", 4.1e-05),
        ("balance_lr", "0.001", "0.01", 0.011),
    ):
        box = _number(page, name)
        assert box.get_attribute("step") == step and box.input_value() == value
        assert box.evaluate("e => e.validity.valid"), f"the browser marks {name}'s default invalid"
        box.focus()
        box.press("ArrowUp")
        assert float(box.input_value()) == pytest.approx(after_up), name  # one press: one step, not 1
    temperature = _number(page, "temperature")
    assert (temperature.get_attribute("min"), temperature.get_attribute("max")) == ("1", "100000")
    assert _number(page, "capture_step").get_attribute("max") == "150"


@pytest.mark.parametrize("page", list(MODELS), indirect=True)
def test_the_live_preview_follows_the_prompt(page, request):
    payload, prompt, family = MODELS[request.node.callspec.params["page"]]
    first, second = (tag.split(":")[1] for tag in prompt.split()[:2])  # the two LoRA names
    _open_freefuse(page, advanced=False)
    preview = page.locator(f"{ID}preview")
    page.locator("#txt2img_prompt textarea").fill(prompt)
    page.wait_for_function(
        "id => document.querySelector(id).innerText.includes('will keep these subjects apart')", arg=f"{ID}preview"
    )
    text = preview.inner_text()
    assert f"FreeFuse on {family}" in text
    assert f'{first}: "{first}" (lora name)' in text and f'{second}: "{second}" (lora name)' in text
    page.locator("#txt2img_prompt textarea").fill(f"<lora:{first}:1> <lora:{second}:1> photo of {first} alone")
    page.wait_for_function("id => document.querySelector(id).innerText.includes('stays global')", arg=f"{ID}preview")
    assert "will not run" in preview.inner_text()


def test_paste_back_restores_the_accordion(page, webui):
    result = webui.txt2img(
        {
            **FLUX_TXT2IMG,
            "prompt": FLUX_SUBJECTS_PROMPT,
            "alwayson_scripts": freefuse(mask_method="paper", capture_step=3),
        }
    )
    page.locator("#txt2img_prompt textarea").fill(result.infotexts[0])
    page.locator("#txt2img_tools #paste").click()
    page.wait_for_function(
        "id => document.querySelector(id).checked", arg=f"{ID}enabled-visible-checkbox", timeout=30_000
    )
    _open_freefuse(page, tick=False)
    assert page.locator(f"{ID}mask_method").get_by_label("paper").is_checked()
    assert _number(page, "capture_step").input_value() == "3"
    assert page.locator(f"{ID}group_paper").is_visible()  # the pasted method's knobs show
    # the image's masks come along and are locked ("Masks from: image")
    _open_layout(page)
    assert page.locator(f"{ID}masks_from").get_by_label("image").is_checked()
    locked = page.locator(f"{ID}locked_masks").locator("input, textarea").first.input_value()
    assert locked.startswith("family=flux; subjects=harry%0Adaiyu; map=")


def _open_layout(page):
    if not page.locator(f"{ID}layout_use").is_visible():
        page.locator(f"{ID}group_layout").get_by_text("Layout", exact=True).first.click()
        page.locator(f"{ID}layout_use").wait_for()


def _drawing_file(tmp_path, width=64, height=64):
    """A colour-coded layout: the first subject (red) on the left three quarters, the second (green) right."""
    from PIL import Image

    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 255, 0), (width * 3 // 4, 0, width, height))
    path = tmp_path / "layout.png"
    image.save(path)
    return path


def _generate(page, tab, prompt):
    for name, value in ((f"{tab}_steps", "6"), (f"{tab}_width", "64"), (f"{tab}_height", "64")):
        box = page.locator(f"#{name} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator(f"#{tab}_prompt textarea").fill(prompt)
    page.locator(f"#{tab}_generate").click()
    page.wait_for_function(
        f"() => document.querySelector('#html_info_{tab}').innerText.includes('FreeFuse subjects')", timeout=120_000
    )
    return page.locator(f"#html_info_{tab}").inner_text()


def test_a_layout_uploaded_onto_the_canvas_gives_the_drawn_masks(page, tmp_path):
    _open_freefuse(page, advanced=False)
    _open_layout(page)
    page.locator(f"{ID}layout input[type=file]").first.set_input_files(str(_drawing_file(tmp_path)))
    page.locator(f"{ID}layout canvas").first.wait_for()
    info = _generate(page, "txt2img", FLUX_SUBJECTS_PROMPT)
    assert "harry: harry 75% (drawn), daiyu: daiyu 25% (drawn)" in info, info


def test_img2img_has_its_own_freefuse_accordion_with_the_layout(page):
    page.locator("#tab_img2img-button").click()  # the main tab (img2img has an inner tab of that name)
    img2img = "#script_img2img_freefuse_"
    page.locator(f"{img2img}enabled-visible-checkbox").check()
    page.locator(f"{img2img}enabled > .label-wrap").click(position={"x": 300, "y": 10})
    page.locator(f"{img2img}subjects").wait_for()
    page.locator(f"{img2img}group_layout").get_by_text("Layout", exact=True).first.click()
    page.locator(f"{img2img}layout").wait_for()
    assert page.locator(f"{img2img}masks_from").is_visible()


@pytest.mark.parametrize("page", list(MODELS), indirect=True)
def test_a_bad_value_gives_a_readable_message_under_the_image(page, request):
    payload, prompt, family = MODELS[request.node.callspec.params["page"]]
    _open_freefuse(page)
    for name, value in (("txt2img_steps", "6"), ("txt2img_width", "64"), ("txt2img_height", "64")):
        box = page.locator(f"#{name} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#txt2img_prompt textarea").fill(prompt)
    capture_step = _number(page, "capture_step")
    capture_step.fill("10")
    capture_step.press("Enter")
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        "() => document.querySelector('#html_info_txt2img').innerText.includes('FreeFuse')", timeout=120_000
    )
    info = page.locator("#html_info_txt2img").inner_text()
    assert "Capture step 10 is not below the number of steps (6)" in info  # named by its label in the web UI


def _reference_file(tmp_path, name, seed):
    import numpy as np
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_reference_images_uploaded_in_the_accordion_drive_latent_refinement(page, tmp_path):
    _open_freefuse(page)
    group = page.locator(f"{ID}group_refine")
    group.scroll_into_view_if_needed()
    group.locator(f"{ID}refine input[type=checkbox]").check()
    page.locator(f"{ID}style_reference input[type=file]").first.set_input_files(
        str(_reference_file(tmp_path, "style.png", 1))
    )
    page.locator(f"{ID}subject_references input[type=file]").first.set_input_files(
        [str(_reference_file(tmp_path, "harry-1.png", 2)), str(_reference_file(tmp_path, "nobody.png", 3))]
    )
    page.locator(f"{ID}subject_references .stem").get_by_text("nobody").wait_for()  # uploaded: "nobody" ".png"
    info = _generate(page, "txt2img", FLUX_SUBJECTS_PROMPT)
    assert "latent refinement ran at " in info and "(style by CLIP tiny-clip; harry by DINO dinov2-tiny)" in info, info
    assert "subject reference 'nobody.png' matches no subject LoRA (harry, daiyu)" in info, info
