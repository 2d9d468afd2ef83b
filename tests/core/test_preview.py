"""Mask pictures: nearest upsampling to any size, palette colours, blending, background, labels."""

import numpy as np
import pytest
import torch
from PIL import Image

from freefuse.preview import BACKGROUND_COLOUR, PALETTE, mask_images, mask_overlay, upsample_nearest

RED, GREEN = PALETTE[0], PALETTE[1]


def two_by_three() -> torch.Tensor:
    """Subject 0 owns the left column and the top middle cell; subject 1 the right column; (1, 1) is free."""
    masks = torch.zeros(2, 2, 3)  # [C, h, w]
    masks[0, :, 0] = 1
    masks[0, 0, 1] = 1
    masks[1, :, 2] = 1
    return masks


def pixel(img: Image.Image, y: int, x: int) -> tuple:
    return img.getpixel((x, y))


def half(colour) -> tuple:
    return tuple(round(c * 0.5) for c in colour)


def test_palette_has_at_least_eight_distinct_colours_and_grey_background():
    assert len(PALETTE) >= 8 and len(set(PALETTE)) == len(PALETTE)
    assert PALETTE[:3] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert BACKGROUND_COLOUR not in PALETTE and len(set(BACKGROUND_COLOUR)) == 1


def test_divisible_upsampling_colours_whole_cells():
    img = mask_overlay(two_by_three(), (40, 60), alpha=1.0)  # cells are 20 x 20 pixels
    assert img.size == (60, 40) and img.mode == "RGB"
    assert pixel(img, 0, 0) == RED and pixel(img, 39, 19) == RED  # left column
    assert pixel(img, 19, 39) == RED and pixel(img, 20, 39) == (0, 0, 0)  # top-middle vs free bottom-middle
    assert pixel(img, 0, 40) == GREEN and pixel(img, 39, 59) == GREEN  # right column
    assert pixel(img, 0, 39) == RED and pixel(img, 0, 40) == GREEN  # column edge at x = 40


def test_non_divisible_upsampling_follows_pixel_centres():
    img = mask_overlay(two_by_three(), (37, 50), alpha=1.0)
    # A pixel takes the cell under its centre: row 0 while (y + 0.5) * 2 / 37 < 1, i.e. y <= 17;
    # column 0 while (x + 0.5) * 3 / 50 < 1 (x <= 16), column 1 while it is < 2 (x <= 32).
    assert pixel(img, 17, 20) == RED and pixel(img, 18, 20) == (0, 0, 0)
    assert pixel(img, 36, 16) == RED and pixel(img, 36, 17) == (0, 0, 0)
    assert pixel(img, 5, 32) == RED and pixel(img, 5, 33) == GREEN
    assert pixel(img, 36, 49) == GREEN


def test_upsample_nearest_gives_every_cell_its_share():
    grid = torch.arange(6.0).reshape(2, 3)
    up = upsample_nearest(grid, (37, 50))
    counts = torch.bincount(up.flatten().long(), minlength=6)
    assert up.shape == (37, 50)
    assert counts.tolist() == [18 * 17, 18 * 16, 18 * 17, 19 * 17, 19 * 16, 19 * 17]


def test_default_blend_over_black_is_half_colour():
    img = mask_overlay(two_by_three(), (40, 60))
    assert pixel(img, 0, 0) == half(RED) and pixel(img, 0, 59) == half(GREEN)
    assert pixel(img, 30, 30) == (0, 0, 0)


def test_blend_over_a_given_image():
    picture = Image.new("RGB", (60, 40), (0, 0, 200))
    img = mask_overlay(two_by_three(), (40, 60), image=picture, alpha=0.25)
    assert pixel(img, 0, 0) == (round(0.25 * 255), 0, round(0.75 * 200))  # red over blue
    assert pixel(img, 30, 30) == (0, 0, 200)  # uncovered: the image unchanged
    assert pixel(img, 0, 59) == (0, round(0.25 * 255), round(0.75 * 200))


def test_image_of_another_size_is_resized():
    picture = Image.new("RGB", (10, 10), (40, 80, 120))
    img = mask_overlay(two_by_three(), (40, 60), image=picture, alpha=0.5)
    assert img.size == (60, 40)
    assert pixel(img, 30, 30) == (40, 80, 120)


def test_background_is_grey():
    background = torch.zeros(2, 3)
    background[1, 1] = 1
    img = mask_overlay(two_by_three(), (40, 60), background=background, alpha=1.0)
    assert pixel(img, 30, 30) == BACKGROUND_COLOUR
    assert pixel(img, 0, 0) == RED


def test_overlapping_masks_mix_colours():
    masks = torch.ones(2, 1, 1)
    img = mask_overlay(masks, (4, 4), alpha=1.0)
    assert pixel(img, 2, 2) == (128, 128, 0)  # half red + half green, round(127.5) = 128


def test_labels_are_drawn_without_changing_the_size():
    plain = mask_overlay(two_by_three(), (64, 96), alpha=1.0)
    labelled = mask_overlay(two_by_three(), (64, 96), alpha=1.0, labels=["harry", "daiyu"])
    with_bg = mask_overlay(two_by_three(), (64, 96), background=torch.zeros(2, 3), labels=["a", "b"])
    assert labelled.size == plain.size == with_bg.size
    corner = np.asarray(labelled)[:20, :40]
    assert not np.array_equal(corner, np.asarray(plain)[:20, :40])  # something was drawn in the corner
    assert np.array_equal(np.asarray(labelled)[40:], np.asarray(plain)[40:])  # nothing elsewhere


def test_wrong_label_count_raises():
    with pytest.raises(ValueError, match="labels"):
        mask_overlay(two_by_three(), (40, 60), labels=["only one"])


def test_mask_images_are_grey_255_inside():
    images = mask_images(two_by_three(), (37, 50))
    assert len(images) == 2 and all(im.mode == "L" and im.size == (50, 37) for im in images)
    first = np.asarray(images[0])
    assert set(np.unique(first).tolist()) == {0, 255}
    assert first[0, 0] == 255 and first[36, 40] == 0 and first[0, 20] == 255
    expected = (upsample_nearest(two_by_three()[1], (37, 50)) * 255).numpy().astype(np.uint8)
    assert np.array_equal(np.asarray(images[1]), expected)


def test_tensor_to_image_keeps_pixel_values_and_layout():
    from freefuse.preview import tensor_to_image

    image = torch.zeros(3, 2, 4)
    image[0, 1, 3] = 1.0  # red at row 1, column 3
    image[2] = 0.5
    pil = tensor_to_image(image)
    assert pil.size == (4, 2) and pil.mode == "RGB"
    assert pil.getpixel((3, 1)) == (255, 0, 128) and pil.getpixel((0, 0)) == (0, 0, 128)


def test_the_style_map_picture_has_a_cell_per_step_and_layer_in_each_region():
    from freefuse.preview import PALETTE, STYLE_COLOUR, UNDECIDED_COLOUR, style_map_picture

    share = torch.zeros(12, 3, 2)  # [steps, layers, regions]
    share[:, :, 1] = 1.0  # the style always won in the second region
    share[0, 0, 0] = float("nan")  # no decision at step 0, layer 0 of the first
    share[5, 2, 0] = 0.5
    picture = style_map_picture(share, ["harry 8% style", "daiyu 100% style"], cell=6)
    title, gap = 14, 4
    panel_w = 12 * 6
    assert picture.size == (2 * (panel_w + gap) + gap, title + 3 * 6 + gap)

    def at(region, step, layer):
        return picture.getpixel((gap + region * (panel_w + gap) + step * 6 + 3, title + layer * 6 + 3))

    assert at(0, 1, 0) == PALETTE[0]  # the subject won
    assert at(0, 0, 0) == UNDECIDED_COLOUR
    assert at(1, 7, 1) == STYLE_COLOUR
    half = tuple(round((a + b) / 2) for a, b in zip(PALETTE[0], STYLE_COLOUR, strict=True))
    assert all(abs(x - y) <= 1 for x, y in zip(at(0, 5, 2), half, strict=True))
