"""Masks the user gives, hints, locks and exports, through the script in Forge's callback order; and given masks
at every UNet level. Runs against either harness's backend (tests/forge_common/)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from freefuse import call_weights
from freefuse.forge import generation as generations
from freefuse.forge.session import Session
from freefuse.layout_inputs import LockedMasks
from freefuse.layouts import Layout, on_grid
from freefuse.preview import PALETTE
from tests.forge_common import script_behaviour
from tests.forge_common.script_behaviour import ON, entry, generate, subjects_line
from tests.forge_common.sdxl_behaviour import _settings as sdxl_settings
from tests.forge_common.sdxl_behaviour import latent_grid, runner
from tests.forge_common.workflow_behaviour import Job, _save_like_forge

webui, model = script_behaviour.webui, script_behaviour.model  # the fixtures
GRID = (4, 4)  # the FLUX token grid of the harness's 64 x 64 images


def _png(array) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _drawing(a_cols=(0, 48), b_cols=(48, 64), size=64) -> np.ndarray:
    """Transparent RGBA; subject A (red) in columns a_cols, subject B (green) in b_cols; None: not drawn."""
    image = np.zeros((size, size, 4), dtype=np.uint8)
    for colour, cols in ((PALETTE[0], a_cols), (PALETTE[1], b_cols)):
        if cols is not None:
            image[:, cols[0] : cols[1]] = (*colour, 255)
    return image


class Seen:
    """What the LoRA hooks were given: the masks of every masked call, the modes, the captures."""

    def __init__(self, monkeypatch):
        self.masks: list[torch.Tensor] = []  # [images, C, h, w] per masked layer call
        self.modes: list[str] = []
        self.captures = 0
        image_weights, begin_call, on_capture = call_weights.image_weights, Session.begin_call, Session.on_capture

        def seen_weights(shape, masks, n_subjects, mode):
            if mode == call_weights.MASKED:
                self.masks.append(masks.clone())
            return image_weights(shape, masks, n_subjects, mode)

        def seen_call(session, *args, **kwargs):
            begin_call(session, *args, **kwargs)
            if session.call is not None:
                self.modes.append(session.call.mode)

        def seen_capture(session, capture):
            self.captures += 1
            on_capture(session, capture)

        monkeypatch.setattr(call_weights, "image_weights", seen_weights)
        monkeypatch.setattr(Session, "begin_call", seen_call)
        monkeypatch.setattr(Session, "on_capture", seen_capture)


def _generate_and_see(harness, webui, both, args, monkeypatch, **kw):
    seen = Seen(monkeypatch)
    p = generate(harness, webui, both, args, **kw)
    return p, seen


# ---------------------------------------------------------------------- given masks
def test_a_drawing_of_every_subject_is_used_exactly_and_nothing_is_captured(harness, webui, model, monkeypatch):
    unet, both, loras = model
    drawing = _drawing()
    p, seen = _generate_and_see(harness, webui, both, [{**ON, "layout": _png(drawing)}], monkeypatch)
    assert not p.comments, p.comments
    expected = on_grid(torch.from_numpy(_mask_planes(drawing)), GRID)  # [2, 4, 4]
    assert seen.captures == 0 and set(seen.modes) == {call_weights.MASKED}  # masked from the first call on
    assert seen.masks and all(torch.equal(m[0], expected) for m in seen.masks)
    assert subjects_line(p) == "A: harry_potter 75% (drawn), B: daiyu_lin 25% (drawn)"  # 48 / 64 columns


def _mask_planes(drawing: np.ndarray) -> np.ndarray:
    """The drawing's subject planes [2, H, W] (red, green)."""
    red = (drawing[..., 0] == 255) & (drawing[..., 1] == 0) & (drawing[..., 3] > 0)
    green = (drawing[..., 1] == 255) & (drawing[..., 0] == 0) & (drawing[..., 3] > 0)
    return np.stack([red, green]).astype(np.float32)


def test_an_undrawn_subject_keeps_its_automatic_mask_and_never_overlaps(harness, webui, model, monkeypatch):
    unet, both, loras = model
    drawing = _drawing(a_cols=(0, 16), b_cols=None)  # only A, in the first token column
    p, seen = _generate_and_see(harness, webui, both, [{**ON, "layout": _png(drawing)}], monkeypatch)
    assert seen.captures == 1 and not p.comments, p.comments
    masks = seen.masks[-1][0]  # [2, 4, 4] what the hooks used after the capture
    assert torch.equal(masks[0], on_grid(torch.from_numpy(_mask_planes(drawing)), GRID)[0])  # exactly the drawing
    assert not (masks[0] * masks[1]).any()
    assert "(drawn)" in subjects_line(p).split(", ")[0] and "(" not in subjects_line(p).split(", ")[1]


def test_a_hint_at_strength_zero_changes_nothing(harness, webui, model):
    unet, both, loras = model
    automatic = generate(harness, webui, both, [ON])
    hint = {**ON, "layout": _png(_drawing()), "layout_use": "hint", "hint_strength": 0.0}
    hinted = generate(harness, webui, both, [hint])
    torch.testing.assert_close(hinted.latent, automatic.latent, rtol=0, atol=0)
    assert "Hint strength is 0, so the layout hint changes nothing" in " ".join(hinted.comments)  # the UI's words
    assert subjects_line(hinted).replace(" (hinted)", "") == subjects_line(automatic)


def test_a_bad_drawing_is_said_once_and_the_image_still_gets_automatic_masks(harness, webui, model):
    unet, both, loras = model
    blue = np.zeros((64, 64, 3), dtype=np.uint8)
    blue[:] = PALETTE[2]  # the third subject's colour; the prompt has two
    p = generate(harness, webui, both, [{**ON, "layout": _png(blue)}])
    (said,) = [c for c in p.comments if "colours that are no subject's" in c]
    assert said.startswith("FreeFuse: the layout drawing has colours") and entry(p, "FreeFuse notes")
    assert subjects_line(p) is not None and "(drawn)" not in subjects_line(p)


# ---------------------------------------------------------------------- locked masks
def test_masks_locked_from_an_images_entry_come_back_exactly_with_another_seed(harness, webui, model, monkeypatch):
    unet, both, loras = model
    first = generate(harness, webui, both, [ON])
    text = entry(first, "FreeFuse masks")
    original = LockedMasks.from_text(text)
    assert original.family == "flux" and original.subjects == ["A", "B"] and original.masks.shape == (2, *GRID)
    seen = Seen(monkeypatch)
    again = generate(harness, webui, both, [{**ON, "masks_from": "image", "locked_masks": text, "temperature": 900.0}])
    assert seen.captures == 0 and all(torch.equal(m[0], original.masks) for m in seen.masks)
    assert torch.equal(LockedMasks.from_text(entry(again, "FreeFuse masks")).masks, original.masks)
    assert subjects_line(again).endswith("(locked)")


def test_masks_from_last_takes_the_last_generations_first_image(harness, webui, model, monkeypatch):
    unet, both, loras = model
    first = generate(harness, webui, both, [ON])
    seen = Seen(monkeypatch)
    generate(harness, webui, both, [{**ON, "masks_from": "last"}])
    expected = LockedMasks.from_text(entry(first, "FreeFuse masks")).masks
    assert seen.captures == 0 and all(torch.equal(m[0], expected) for m in seen.masks)
    assert generations.last_masks().subjects == ["A", "B"]


def test_locked_masks_of_other_subjects_are_refused_with_one_message(harness, webui, model):
    unet, both, loras = model
    other = LockedMasks("flux", ["ron", "B"], torch.ones(2, 4, 4)).to_text()
    p = generate(harness, webui, both, [{**ON, "masks_from": "image", "locked_masks": other}])
    assert [c for c in p.comments if "are for the subjects ron, B, this prompt's are A, B" in c]
    assert "(locked)" not in subjects_line(p)


# ---------------------------------------------------------------------- exported masks
def test_exported_masks_are_saved_beside_the_image_and_named_for_api_clients(harness, webui, model, tmp_path):
    unet, both, loras = model
    job = Job(harness, webui, [{**ON, "export_masks": True, "layout": _png(_drawing())}], api=True)
    p = job.start(both)
    p.save_samples = lambda: True  # an API request that asked Forge to save its images
    job.batch(0, both)
    (saved,) = _save_like_forge(webui, job, p, tmp_path)
    job.finish()
    a_file, b_file = (tmp_path / saved.replace(".png", f"-freefuse-{lora}.png").split("/")[-1] for lora in "AB")
    a_mask = np.asarray(Image.open(a_file))
    assert a_mask.shape == (64, 64) and a_mask[:, :32].min() == 255 and a_mask[:, 48:].max() == 0  # 4 tokens
    assert np.array_equal(np.asarray(Image.open(b_file)), 255 - a_mask)
    listed = p.extra_generation_params["FreeFuse mask images"]
    assert [(e["image"], e["subject"]) for e in listed] == [(0, "A"), (0, "B")]
    api_images = job.processed.images + p.extra_result_images  # what the API returns, in order
    assert np.array_equal(np.asarray(api_images[listed[0]["index"]]), a_mask)


def test_exported_masks_are_not_added_to_the_web_uis_gallery(harness, webui, model):
    unet, both, loras = model
    p = generate(harness, webui, both, [{**ON, "export_masks": True, "show_masks": False}])
    assert p.extra_result_images == [] and "FreeFuse mask images" not in p.extra_generation_params


# ---------------------------------------------------------------------- SDXL: given masks at every level
def test_sdxl_given_masks_reach_every_unet_level_taken_from_the_drawing(harness, monkeypatch):
    unet = harness.make_sdxl_unet(seed=0)
    loras = [harness.make_lora(unet, name=n, seed=i + 1) for i, n in enumerate("AB")]
    both = harness.add_loras(unet, [(lora, 1.0) for lora in loras])
    planes = torch.zeros(2, 96, 96)
    planes[0, :, :32] = 1  # A: the left third, on a token boundary of every level (8, 16, 32 pixels a token)
    planes[1, :, 32:] = 1
    layout = Layout(planes, [True, True])
    settings = sdxl_settings()
    seen = Seen(monkeypatch)
    given = layout.given(latent_grid(torch.zeros(1, 4, 12, 12)), 1)  # the latent grid of a 96 x 96 image
    runner(harness, settings, loras, masks=given, layout=layout).sample(both, seed=5, height=96, width=96)
    grids = {tuple(m.shape[-2:]) for m in seen.masks}
    assert len(grids) >= 2, grids  # several UNet levels
    for masks in seen.masks:
        assert torch.equal(masks[0], on_grid(planes, tuple(masks.shape[-2:]))), masks.shape
    assert seen.captures == 0


@pytest.fixture(autouse=True)
def forget_the_last_generation(monkeypatch):
    """Each test starts as if no generation had run ("Masks from: last" has nothing)."""
    monkeypatch.setattr(generations, "_last", None)


def test_the_hires_pass_takes_a_drawn_layout_to_its_own_grid_exactly(harness, webui, model, monkeypatch):
    unet, both, loras = model
    drawing = _drawing()
    job = Job(harness, webui, [{**ON, "layout": _png(drawing)}])
    job.start(both)
    seen = Seen(monkeypatch)
    job.batch(0, both, hires_size=(128, 128))
    p = job.finish()
    hires = [m for m in seen.masks if tuple(m.shape[-2:]) == (8, 8)]  # the hires pass's FLUX token grid
    assert hires and all(torch.equal(m[0], on_grid(torch.from_numpy(_mask_planes(drawing)), (8, 8))) for m in hires)
    assert seen.captures == 0 and not p.comments, p.comments


def test_a_script_that_replaces_forges_sampling_leaves_freefuse_out_and_says_so(webui, model):
    unet, both, loras = model
    script = webui.module.FreeFuseScript()
    script.ui(False)
    p = script_behaviour.Processing(script_behaviour.PROMPT, both)
    script.process(p, ON)
    script.postprocess_batch(p, ON, images=torch.rand(1, 3, 64, 64), batch_number=0)  # no sampling pass seen
    assert [c for c in p.comments if "Forge's sampling was replaced" in c]


def test_an_api_client_sending_locked_masks_without_masks_from_image_is_told(harness, webui, model):
    unet, both, loras = model
    text = LockedMasks("flux", ["A", "B"], torch.ones(2, 4, 4)).to_text()
    p = generate(harness, webui, both, [{**ON, "locked_masks": text}], api=True)
    assert [c for c in p.comments if "locked_masks was given but masks_from is automatic" in c]
