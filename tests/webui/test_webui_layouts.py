"""Masks the user steers, keeps and takes elsewhere, through a real Forge over HTTP: a drawn layout (txt2img,
img2img, inpaint "only masked"), masks locked from a saved PNG, exported masks on disk and in the API response.

The masks each image was made with come back in its "FreeFuse masks" entry (LockedMasks), so what FreeFuse used
is read from the response, not guessed from pixels.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from freefuse.layout_inputs import LockedMasks
from freefuse.layouts import on_grid
from freefuse.preview import PALETTE
from tests.webui.payloads import FLUX_SUBJECTS_PROMPT, FLUX_TXT2IMG, SDXL_SUBJECTS_PROMPT, SDXL_TXT2IMG, freefuse
from tests.webui.test_workflows import FAMILIES, entry, notes, same

pytestmark = pytest.mark.slow
FLUX_SUBJECTS = "harry: harry\ndaiyu: daiyu"


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _layout(width=64, height=64, split=0.75) -> tuple[str, torch.Tensor]:
    """A transparent canvas, subject 1 (red) left of ``split``, subject 2 (green) right of it; and its planes."""
    canvas = np.zeros((height, width, 4), dtype=np.uint8)
    cut = int(width * split)
    canvas[:, :cut] = (*PALETTE[0], 255)
    canvas[:, cut:] = (*PALETTE[1], 255)
    planes = torch.zeros(2, height, width)
    planes[0, :, :cut], planes[1, :, cut:] = 1, 1
    return _b64(Image.fromarray(canvas)), planes


def masks_used(result, index=0) -> LockedMasks:
    return LockedMasks.from_text(entry(result.infotexts[index], "FreeFuse masks"))


def _subjects_for(checkpoint: str) -> dict:
    return {"subjects": FLUX_SUBJECTS} if checkpoint.startswith("flux") else {}


@pytest.mark.parametrize(("checkpoint", "payload", "prompt"), FAMILIES)
def test_a_drawn_layout_gives_exactly_its_masks_in_txt2img_and_img2img(webui, checkpoint, payload, prompt):
    webui.select_model(checkpoint)
    drawing, planes = _layout()
    settings = freefuse(layout=drawing, **_subjects_for(checkpoint))
    made = webui.txt2img({**payload, "prompt": prompt, "alwayson_scripts": settings})
    assert notes(made) == "", notes(made)
    assert entry(made.infotexts[0], "FreeFuse subjects").count("(drawn)") == 2
    used = masks_used(made)
    assert torch.equal(used.masks, on_grid(planes, tuple(used.masks.shape[-2:])))
    img2img = {**payload, "prompt": prompt, "init_images": [_b64(made.images[0])], "denoising_strength": 0.6}
    again = webui.img2img({**img2img, "alwayson_scripts": settings})
    assert notes(again) == "", notes(again)
    assert torch.equal(masks_used(again).masks, used.masks)
    assert entry(again.infotexts[0], "FreeFuse subjects").count("(drawn)") == 2


@pytest.mark.parametrize(("checkpoint", "payload", "prompt"), FAMILIES)
def test_img2img_captures_its_own_masks_on_the_steps_it_samples(webui, checkpoint, payload, prompt):
    webui.select_model(checkpoint)
    source = webui.txt2img({**payload, "prompt": prompt}).images[0]
    body = {**payload, "prompt": prompt, "init_images": [_b64(source)], "denoising_strength": 0.6}
    result = webui.img2img({**body, "alwayson_scripts": freefuse(capture_step=1, **_subjects_for(checkpoint))})
    assert notes(result) == "", notes(result)
    assert entry(result.infotexts[0], "FreeFuse subjects") and masks_used(result).masks.sum() > 0
    assert len(result.images) == 2  # the image and its mask picture
    plain = webui.img2img(body)
    assert not same(plain.images[0], result.images[0])
    sampled = int(0.6 * payload["steps"]) + 1  # Forge samples the last t_enc + 1 steps of the schedule
    late = freefuse(capture_step=sampled, **_subjects_for(checkpoint))
    too_late = webui.img2img({**body, "alwayson_scripts": late})
    assert f"capture_step {sampled} is not below the number of steps ({sampled})" in notes(too_late)


def test_inpaint_only_masked_uses_the_part_of_the_layout_inside_the_inpaint_area(webui):
    """A 128 x 64 image, inpainted in its right half only (a 64 x 64 crop, generated at 64 x 64): the drawing's
    left half (harry) falls outside, its right half (daiyu) fills the whole crop."""
    webui.select_model("flux_a")
    source = webui.txt2img({**FLUX_TXT2IMG, "width": 128, "prompt": FLUX_SUBJECTS_PROMPT}).images[0]
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (64, 0, 128, 64))
    drawing, _ = _layout(width=128, split=0.5)
    body = {
        **FLUX_TXT2IMG,
        "prompt": FLUX_SUBJECTS_PROMPT,
        "init_images": [_b64(source)],
        "mask": _b64(mask),
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 0,
        "mask_blur": 0,
        "denoising_strength": 0.8,
    }
    result = webui.img2img(
        {**body, "alwayson_scripts": freefuse(layout=drawing, capture_step=1, subjects=FLUX_SUBJECTS)}
    )
    assert notes(result) == "", notes(result)
    line = entry(result.infotexts[0], "FreeFuse subjects")
    assert line == "harry: harry 0%, daiyu: daiyu 100% (drawn)", line
    assert result.images[0].size == (128, 64)  # Forge pasted the crop back


def test_masks_locked_from_a_saved_png_come_back_exactly(webui):
    webui.select_model("flux_a")
    body = {**FLUX_TXT2IMG, "prompt": FLUX_SUBJECTS_PROMPT}
    first = webui.txt2img({**body, "alwayson_scripts": freefuse()})
    saved = webui.png_info(first.png[0])
    text = saved["parameters"]["FreeFuse masks"]
    assert text == entry(first.infotexts[0], "FreeFuse masks") and text.startswith("family=flux; subjects=harry")
    # an API client locks them by name, with another seed
    locked = webui.txt2img({**body, "seed": 5, "alwayson_scripts": freefuse(masks_from="image", locked_masks=text)})
    assert notes(locked) == "" and masks_used(locked).masks.equal(masks_used(first).masks)
    assert entry(locked.infotexts[0], "FreeFuse subjects").count("(locked)") == 2
    unlocked = webui.txt2img({**body, "seed": 5, "alwayson_scripts": freefuse()})
    assert not masks_used(unlocked).masks.equal(masks_used(first).masks)  # the seed alone moves the masks
    # pasting the PNG's parameters (PNG Info > Send to txt2img) locks them too
    lists = {"styles": [], "hr_additional_modules": ["Use same choices"]}
    pasted = webui.txt2img({**body, **lists, "infotext": saved["info"]})
    assert masks_used(pasted).masks.equal(masks_used(first).masks)
    assert "(locked)" in entry(pasted.infotexts[0], "FreeFuse subjects")


def test_locked_masks_from_another_family_are_refused_with_one_message(webui):
    webui.select_model("flux_a")
    flux = webui.txt2img({**FLUX_TXT2IMG, "prompt": FLUX_SUBJECTS_PROMPT, "alwayson_scripts": freefuse()})
    webui.select_model("sdxl_a")
    text = entry(flux.infotexts[0], "FreeFuse masks")
    result = webui.txt2img(
        {
            **SDXL_TXT2IMG,
            "prompt": SDXL_SUBJECTS_PROMPT,
            "alwayson_scripts": freefuse(masks_from="image", locked_masks=text),
        }
    )
    assert "made on a FLUX model, this is SDXL" in notes(result)
    assert "(locked)" not in entry(result.infotexts[0], "FreeFuse subjects")


def test_exported_masks_are_saved_beside_the_image_and_returned_by_subject(webui, tmp_path):
    webui.select_model("flux_a")
    drawing, planes = _layout()
    webui.set_options(samples_save=True, outdir_txt2img_samples=str(tmp_path))
    try:
        body = {**FLUX_TXT2IMG, "prompt": FLUX_SUBJECTS_PROMPT, "save_images": True}
        result = webui.txt2img(
            {**body, "alwayson_scripts": freefuse(layout=drawing, export_masks=True, subjects=FLUX_SUBJECTS)}
        )
    finally:
        webui.set_options(samples_save=False)
    listed = result.extra_generation_params["FreeFuse mask images"]
    assert [(e["image"], e["subject"]) for e in listed] == [(0, "harry"), (0, "daiyu")]
    harry = result.images[listed[0]["index"]]
    assert np.array_equal(np.asarray(harry.convert("L")) > 127, planes[0].numpy() > 0.5)  # 48 of 64 columns
    (image,) = [p for p in tmp_path.rglob("*.png") if "-freefuse-" not in p.name]
    for e in listed:
        beside = image.with_name(f"{image.stem}-freefuse-{e['subject']}.png")
        assert beside.is_file() and same(beside, result.images[e["index"]])
