"""Layouts the user gives: drawings and mask images to grid masks, given + automatic masks, hints on the maps,
and masks packed into an infotext value and read back. Synthetic inputs with known answers."""

import numpy as np
import pytest
import torch

from freefuse.layouts import (
    combine,
    decode_masks,
    encode_masks,
    hinted_maps,
    layout_from_drawing,
    layout_from_masks,
    on_grid,
)
from freefuse.partition import SubjectMasks, partition_balanced
from freefuse.preview import PALETTE

RED, GREEN, BLUE = PALETTE[0], PALETTE[1], PALETTE[2]


def _drawing(height=40, width=60, alpha=False):
    """White paper, subject 0 (red) on the left third, subject 1 (green) on the right third."""
    image = np.full((height, width, 4 if alpha else 3), 255, dtype=np.uint8)
    image[:, : width // 3, :3] = RED
    image[:, 2 * width // 3 :, :3] = GREEN
    return image


def test_a_colour_coded_drawing_gives_one_mask_per_subject_in_palette_order():
    layout = layout_from_drawing(_drawing(), 2)
    assert layout.problems == [] and layout.drawn == [True, True]
    assert layout.masks.shape == (2, 40, 60)
    assert layout.masks[0, :, :20].all() and not layout.masks[0, :, 20:].any()
    assert layout.masks[1, :, 40:].all() and not layout.masks[1, :, :40].any()


def test_brush_edges_count_and_paper_black_and_transparency_do_not():
    image = _drawing(alpha=True)
    image[0, 0, :3] = (225, 35, 30)  # an anti-aliased red edge
    image[5:10, 25:30, :3] = (0, 0, 0)  # a black outline: paper
    image[:, 20:25, :3] = GREEN
    image[:, 20:25, 3] = 0  # green but transparent: nothing drawn
    layout = layout_from_drawing(image, 2)
    assert layout.masks[0, 0, 0] == 1 and not layout.masks[:, 5:10, 25:30].any()
    assert not layout.masks[1, :, 20:25].any() and layout.problems == []


def test_a_colour_that_is_no_subject_is_reported_and_ignored():
    image = _drawing()
    image[:, 20:40] = BLUE  # the third palette colour, but the prompt has two subjects
    layout = layout_from_drawing(image, 2)
    (problem,) = layout.problems
    assert "colours that are no subject's" in problem and "red, green" in problem
    assert not layout.masks[:, :, 20:40].any()


def test_an_undrawn_subject_stays_automatic():
    image = _drawing()
    image[:, 40:] = 255
    layout = layout_from_drawing(image, 2)
    assert layout.drawn == [True, False]


def test_black_and_white_images_give_masks_and_a_photo_is_refused():
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[:, :16] = 255
    photo = np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (32, 1))  # a grey ramp: not a mask
    layout = layout_from_masks([mask, photo], 2)
    assert layout.drawn == [True, False]
    assert "mask image 2 is not a black/white mask" in layout.problems[0]
    assert layout.masks[0, :, :16].all() and not layout.masks[0, :, 16:].any()
    small = layout_from_masks([None, np.full((8, 12), 255, dtype=np.uint8)], 2)
    assert small.drawn == [False, True]


def test_masks_go_to_any_grid_by_majority_of_each_tokens_area():
    layout = layout_from_drawing(_drawing(height=64, width=96), 2)
    grid = on_grid(layout.masks, (4, 6))  # each token covers 16 x 16 pixels
    assert grid[0].tolist() == [[1, 1, 0, 0, 0, 0]] * 4
    assert grid[1].tolist() == [[0, 0, 0, 0, 1, 1]] * 4
    wide = on_grid(layout.masks, (2, 9))  # another aspect ratio: the drawing is stretched to the image
    assert wide[0, 0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]


def _automatic(grid=(4, 6), batch=1):
    masks = torch.zeros(batch, 2, *grid)
    masks[:, 0, :, :3] = 1
    masks[:, 1, :, 3:] = 1
    return SubjectMasks(masks=masks, background=torch.zeros(batch, *grid))


def test_given_masks_are_kept_exactly_and_automatic_ones_lose_what_is_drawn():
    given = torch.zeros(2, 4, 6)
    given[0, :, 4:] = 1  # subject 0 drawn on the right
    result = combine(given, [True, False], _automatic(batch=2), batch=2)
    assert torch.equal(result.masks[:, 0], given[0].expand(2, -1, -1))
    assert result.masks[:, 1, :, 3].all() and not result.masks[:, 1, :, 4:].any()  # automatic minus the drawing
    assert (result.masks.sum(1) <= 1).all()  # never overlapping


def test_when_every_subject_is_drawn_no_automatic_masks_are_needed_and_the_first_wins_an_overlap():
    given = torch.zeros(2, 4, 6)
    given[0, :, :4] = 1
    given[1, :, 2:] = 1
    result = combine(given, [True, True], None, batch=3)
    assert result.masks.shape == (3, 2, 4, 6)
    assert result.masks[0, 0, :, :4].all() and not result.masks[0, 1, :, :4].any()
    assert result.masks[0, 1, :, 4:].all() and result.background[0].sum() == 0
    with pytest.raises(ValueError, match="automatic masks are needed"):
        combine(given, [True, False], None, batch=1)


def _ambiguous_maps(h=8, w=8):
    """Two subjects whose maps favour the left half slightly for subject 0: the split is 0 left, 1 right."""
    x = torch.linspace(0, 1, w).repeat(h, 1).flatten()  # [N], 0 at the left edge
    maps = torch.stack([1.0 - 0.1 * x, 0.9 + 0.1 * x])[None]  # [1, 2, N]
    return maps / maps.sum(-1, keepdim=True)


def test_a_hint_moves_an_ambiguous_split_to_the_hinted_side_and_strength_zero_changes_nothing():
    maps = _ambiguous_maps()
    plain = partition_balanced(maps, None, (8, 8), morphology=False).masks[0]
    assert plain[0, :, 0].all() and plain[1, :, -1].all()  # subject 0 on the left
    hint = torch.zeros(2, 8, 8)
    hint[1, :, :3] = 1  # "subject 1 on the left"
    assert torch.equal(hinted_maps(maps, hint, [False, True], 0.0), maps)
    steered = partition_balanced(hinted_maps(maps, hint, [False, True], 0.5), None, (8, 8), morphology=False)
    assert steered.masks[0, 1, :, 0].all() and not steered.masks[0, 0, :, 0].any()  # subject 1 now on the left


def test_masks_travel_as_a_short_text_and_come_back_exactly():
    grid = torch.zeros(2, 64, 64)
    grid[0, 10:40, 5:30] = 1
    grid[1, 20:60, 35:60] = 1
    text = encode_masks(grid)
    assert text.startswith("64x64:") and len(text) < 600 and "," not in text and text.count(":") == 1
    assert torch.equal(decode_masks(text, 2), grid)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("no map", "not a FreeFuse mask map"),
        ("4x4:AAAA", "damaged"),
        ("2x2:" + encode_masks(torch.ones(1, 3, 3))[4:], "holds 9"),
    ],
)
def test_a_damaged_mask_text_is_a_clear_error(text, reason):
    with pytest.raises(ValueError, match=reason):
        decode_masks(text, 2)


def test_a_mask_text_with_more_subjects_than_the_prompt_is_refused():
    with pytest.raises(ValueError, match="3 subjects, this prompt 2"):
        decode_masks(encode_masks(torch.eye(3)[:, :, None].repeat(1, 1, 2)), 2)


def test_partition_with_a_layout_uses_drawn_masks_exactly_and_hints_as_a_prior():
    from freefuse.layouts import Layout
    from freefuse.maps import SimilarityMaps
    from freefuse.masks import FLUX, partition_maps
    from freefuse.settings import FreeFuseSettings

    settings = FreeFuseSettings.defaults("flux").replace(morphology=False)
    maps = SimilarityMaps(_ambiguous_maps(), None)
    drawn = torch.zeros(2, 16, 16)
    drawn[1, :, :6] = 1  # "subject 1 on the left", drawn on a 16 x 16 picture of the image
    given = partition_maps(maps, (8, 8), settings, FLUX, layout=Layout(drawn, [False, True], use="masks"))
    assert torch.equal(given.masks[0, 1], on_grid(drawn, (8, 8))[1])  # exactly the drawing
    assert not (given.masks[0, 0] * given.masks[0, 1]).any()  # the automatic subject keeps the rest only
    hint = Layout(drawn, [False, True], use="hint", strength=0.5)
    hinted = partition_maps(maps, (8, 8), settings, FLUX, layout=hint)
    assert hinted.masks[0, 1, :, 0].all()  # the hint moved the split
    assert Layout(drawn, [True, True], use="hint", strength=1.0).complete  # full strength: the drawing itself
    assert not hint.complete and not Layout(drawn, [False, True]).complete
