"""Where a generation's masks come from: drawings and mask images as the UI and the API send them, a pasted
image's masks, the last generation's, and one message per bad input (the generation goes on)."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from freefuse.layout_inputs import DRAWN, HINTED, LOCKED, LockedMasks, choose_layout, read_image
from freefuse.layouts import Layout, encode_masks
from freefuse.masks import FLUX, SDXL
from freefuse.preview import PALETTE
from freefuse.settings import FreeFuseSettings

SUBJECTS = ["harry", "daiyu"]
SETTINGS = FreeFuseSettings.defaults("flux").replace(enabled=True)


def _drawing(width=60, height=40):
    """RGBA, transparent; red (subject 1) on the left third, green (subject 2) on the right third."""
    image = np.zeros((height, width, 4), dtype=np.uint8)
    image[:, : width // 3] = (*PALETTE[0], 255)
    image[:, 2 * width // 3 :] = (*PALETTE[1], 255)
    return image


def _png(array) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _locked(family="flux", subjects=("harry", "daiyu")):
    masks = torch.zeros(len(subjects), 4, 6)
    masks[0, :, :2] = 1
    masks[1, :, 4:] = 1
    return LockedMasks(family, list(subjects), masks)


def test_nothing_given_means_automatic_masks_and_nothing_to_say():
    empty_canvas = {"background": None, "layers": [], "composite": None}
    choice = choose_layout(SETTINGS, {"layout": empty_canvas, "layout_masks": None}, SUBJECTS, "flux")
    assert choice.layout is None and choice.sources == ["automatic", "automatic"] and choice.messages == []
    transparent = {"composite": np.zeros((8, 8, 4), dtype=np.uint8)}  # the editor before anything is drawn
    assert choose_layout(SETTINGS, {"layout": transparent}, SUBJECTS, "flux").layout is None


@pytest.mark.parametrize(
    "sent",
    [
        lambda a: {"background": None, "layers": [a], "composite": a},  # the web UI's ImageEditor value
        _png,  # an API client: a base64 PNG
        lambda a: "data:image/png;base64," + _png(a),  # or a data URL
        lambda a: {"composite": _png(a)},
        Image.fromarray,
    ],
)
def test_a_drawing_arrives_in_any_of_its_forms_and_gives_the_drawn_masks(sent):
    choice = choose_layout(SETTINGS, {"layout": sent(_drawing())}, SUBJECTS, "flux")
    assert choice.messages == [] and choice.sources == [DRAWN, DRAWN]
    assert choice.layout.complete and choice.layout.masks[0, :, :20].all()


def test_the_drawing_is_a_hint_when_asked_and_says_so_in_the_sources():
    hint = SETTINGS.replace(layout_use="hint", hint_strength=0.4)
    choice = choose_layout(hint, {"layout": _png(_drawing())}, SUBJECTS, "flux")
    assert choice.sources == [HINTED, HINTED] and not choice.layout.complete and choice.layout.strength == 0.4
    zero = choose_layout(hint.replace(hint_strength=0.0), {"layout": _png(_drawing())}, SUBJECTS, "flux")
    assert zero.messages == ["hint_strength is 0, so the layout hint changes nothing"]


def test_mask_images_one_per_subject_and_an_undrawn_subject_stays_automatic():
    left = np.zeros((40, 60), dtype=np.uint8)
    left[:, :20] = 255
    choice = choose_layout(SETTINGS, {"layout_masks": [_png(left)]}, SUBJECTS, "flux")
    assert choice.sources == [DRAWN, "automatic"] and not choice.layout.complete


def test_file_paths_are_read_for_the_web_ui_only(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(path)
    ui = choose_layout(SETTINGS, {"layout_masks": [str(path)]}, SUBJECTS, "flux", allow_paths=True)
    assert ui.sources == [DRAWN, "automatic"]
    api = choose_layout(SETTINGS, {"layout_masks": [str(path)]}, SUBJECTS, "flux", allow_paths=False)
    assert api.layout is None
    assert api.messages == [
        "mask image 1 cannot be read (not a base64-encoded PNG or JPEG); that subject's mask is automatic"
    ]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"layout": "not an image"}, "the layout drawing cannot be read (not a base64-encoded PNG or JPEG)"),
        ({"layout": _png(np.full((8, 8, 3), 255, dtype=np.uint8))}, "the layout has no subject's colour in it"),
        ({"layout": _png(np.full((8, 8, 3), PALETTE[2], dtype=np.uint8))}, "colours that are no subject's"),
        ({"layout_masks": [_png(np.zeros((8, 8), dtype=np.uint8))]}, "mask image 1 is empty (all black)"),
        (
            {"layout_masks": [_png(np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1)))]},
            "mask image 1 is not a black/white mask",
        ),
    ],
)
def test_each_bad_input_gets_one_message_and_automatic_masks(inputs, message):
    choice = choose_layout(SETTINGS, inputs, SUBJECTS, "flux")
    assert choice.layout is None and choice.sources == ["automatic", "automatic"]
    (said,) = choice.messages  # one message per bad input
    assert message in said


def test_the_masks_entry_round_trips_exactly_and_reads_the_subjects_in_the_prompts_order():
    locked = _locked()
    text = locked.to_text()
    assert text.startswith("family=flux; subjects=harry%0Adaiyu; map=4x6%3A") and "," not in text
    back = LockedMasks.from_text(text)
    assert back.family == "flux" and back.subjects == SUBJECTS and torch.equal(back.masks, locked.masks)
    choice = choose_layout(SETTINGS.replace(masks_from="image"), {"locked_masks": text}, ["daiyu", "harry"], "flux")
    assert choice.sources == [LOCKED, LOCKED] and choice.layout.complete and choice.messages == []
    assert torch.equal(choice.layout.masks, locked.masks[[1, 0]])  # daiyu first now


def test_the_last_generations_masks_are_locked_by_masks_from_last():
    choice = choose_layout(SETTINGS.replace(masks_from="last"), {}, SUBJECTS, "flux", last=_locked())
    assert choice.sources == [LOCKED, LOCKED] and torch.equal(choice.layout.masks, _locked().masks)
    none = choose_layout(SETTINGS.replace(masks_from="last"), {}, SUBJECTS, "flux", last=None)
    assert none.layout is None and "no generation has made masks yet" in none.messages[0]


@pytest.mark.parametrize(
    ("locked_text", "message"),
    [
        (None, "no image's masks were pasted"),
        ("family=flux; subjects=harry", "not a FreeFuse masks entry"),
        (_locked(family="sdxl").to_text(), "made on a SDXL model, this is FLUX"),
        (_locked(subjects=("ron", "daiyu")).to_text(), "are for the subjects ron, daiyu, this prompt's are harry"),
    ],
)
def test_a_locked_layout_that_does_not_fit_says_why_and_masks_are_automatic(locked_text, message):
    choice = choose_layout(SETTINGS.replace(masks_from="image"), {"locked_masks": locked_text}, SUBJECTS, "flux")
    assert choice.layout is None and any(message in m for m in choice.messages), choice.messages


def test_a_locked_empty_mask_is_said_and_a_drawing_next_to_locked_masks_is_not_used():
    masks = _locked().masks
    masks[1] = 0
    text = LockedMasks("flux", SUBJECTS, masks).to_text()
    choice = choose_layout(
        SETTINGS.replace(masks_from="image"), {"locked_masks": text, "layout": _png(_drawing())}, SUBJECTS, "flux"
    )
    assert choice.layout.complete
    assert choice.messages == [
        "masks_from is image, so the layout drawing and mask images are not used",
        "the pasted image's masks give subject daiyu no area; it stays without its LoRA there",
    ]


def test_read_image_takes_floats_and_refuses_what_is_no_image():
    assert read_image(np.ones((2, 2, 3), dtype=np.float32)).max() == 255
    assert read_image("") is None and read_image(None) is None
    with pytest.raises(ValueError, match="expected an image"):
        read_image(42)


def test_an_inpaint_region_crops_the_layout_and_what_falls_outside_is_undrawn():
    drawn = Layout(torch.from_numpy(np.stack([_drawing()[..., 0] > 0, _drawing()[..., 1] > 0]).astype(np.float32)),
                   [True, True])  # fmt: skip
    right = drawn.cropped((0.5, 0.0, 1.0, 1.0))  # the right half of the image
    assert right.masks.shape == (2, 40, 30) and right.drawn == [False, True]
    assert right.masks[1, :, 10:].all() and not right.masks[1, :, :10].any()


def test_the_finest_token_grid_of_each_family():
    assert FLUX.token_grid(1024, 768) == (64, 48) and FLUX.token_grid(1000, 1000) == (63, 63)
    assert SDXL.token_grid(1024, 768) == (128, 96)


def test_an_encoded_map_is_what_the_masks_entry_carries():
    assert _locked().to_text().endswith(encode_masks(_locked().masks).replace(":", "%3A").replace("=", "%3D"))


def test_a_huge_drawing_is_classified_at_a_bounded_resolution():
    from freefuse.layouts import layout_from_drawing

    big = np.zeros((3000, 2000, 4), dtype=np.uint8)
    big[:, :1000] = (*PALETTE[0], 255)
    layout = layout_from_drawing(big, 2)
    assert max(layout.masks.shape[-2:]) <= 1024 and layout.drawn == [True, False]
    assert layout.masks[0, :, : layout.masks.shape[-1] // 2 - 1].all()
