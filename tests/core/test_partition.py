"""Maps -> masks: morphology, foreground, the official balanced partition, mask resizing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freefuse.partition import (
    BalanceParams,
    SubjectMasks,
    foreground,
    open_close,
    partition_balanced,
    resize_masks,
)


def grid(rows: list[str]) -> torch.Tensor:
    """``[1, h, w]`` bool from strings of '#' (True) and '.' (False)."""
    return torch.tensor([[ch == "#" for ch in row] for row in rows]).unsqueeze(0)


# --- open_close --------------------------------------------------------------------------------


def test_opening_removes_a_one_pixel_speck_and_closing_fills_a_one_pixel_hole():
    mask = grid(
        [
            "..........",
            ".#........",
            "..........",
            "....#####.",
            "....##.##.",
            "....#####.",
            "..........",
        ]
    )
    expected = grid(
        [
            "..........",
            "..........",
            "..........",
            "....#####.",
            "....#####.",
            "....#####.",
            "..........",
        ]
    )
    assert torch.equal(open_close(mask), expected)


def test_a_two_by_two_block_survives_and_nothing_shifts():
    mask = grid(
        [
            "##.......",
            "##.......",
            ".........",
            "...####..",
            "...####..",
            ".........",
            ".......##",
            ".......##",
        ]
    )
    assert torch.equal(open_close(mask), mask)


def test_one_pixel_wide_lines_are_removed_and_one_pixel_gaps_are_bridged():
    line = grid(["......", "######", "......"])
    assert not open_close(line).any()
    gap = grid(["###.###", "###.###", "###.###"])
    assert open_close(gap).all()


def test_background_outside_the_grid_does_not_eat_an_edge_region():
    full = torch.ones(1, 5, 7, dtype=torch.bool)
    assert open_close(full).all()
    assert not open_close(~full).any()


def test_kernel_one_is_the_identity_and_kernel_three_removes_a_two_by_two_speck():
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    mask[0, 4:9, 4:9] = True
    assert torch.equal(open_close(mask, kernel=1), mask)
    expected = torch.zeros_like(mask)
    expected[0, 4:9, 4:9] = True
    assert torch.equal(open_close(mask, kernel=3), expected)


masks_2d = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 10_000))


def random_mask(b, h, w, seed, p=0.6):
    return torch.rand(b, h, w, generator=torch.Generator().manual_seed(seed)) < p


@settings(max_examples=60, deadline=None)
@given(shape=masks_2d, kernel=st.integers(1, 3))
def test_open_close_keeps_the_size_is_idempotent_and_commutes_with_flips(shape, kernel):
    mask = random_mask(*shape)
    out = open_close(mask, kernel)
    assert out.shape == mask.shape and out.dtype == torch.bool
    assert torch.equal(open_close(out, kernel), out)  # an open-close filter is idempotent
    for dims in [(1,), (2,), (1, 2)]:  # no half-pixel shift: mirroring the input mirrors the output
        assert torch.equal(open_close(mask.flip(dims), kernel), out.flip(dims))
    assert torch.equal(open_close(mask.transpose(1, 2), kernel), out.transpose(1, 2))


# --- foreground --------------------------------------------------------------------------------


def test_without_background_every_token_is_foreground():
    fg = foreground(torch.rand(2, 3, 12), None, (3, 4))
    assert fg.shape == (2, 3, 4) and fg.dtype == torch.bool and fg.all()


def test_background_wins_only_where_its_scaled_value_beats_every_subject():
    subjects = torch.tensor([[[0.50, 0.10, 0.96, 0.20], [0.20, 0.10, 0.10, 0.95]]])  # [1, 2, 4]
    background = torch.tensor([[1.00, 1.00, 1.00, 1.00]])  # scaled by 0.95
    fg = foreground(subjects, background, (1, 4), morphology=False)
    assert fg.tolist() == [[[False, False, True, True]]]  # 0.95 ties with 0.95: a tie stays foreground
    fg_low = foreground(subjects, background, (1, 4), bg_scale=0.4, morphology=False)
    assert fg_low.tolist() == [[[True, False, True, True]]]


def test_morphology_fills_a_background_hole_and_drops_a_foreground_speck():
    h, w = 8, 8
    subjects = torch.zeros(1, 2, h * w)
    background = torch.ones(1, h * w)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[1:6, 1:6] = True
    inside[3, 3] = False  # hole
    subjects[0, 0, inside.reshape(-1)] = 2.0
    subjects[0, 1, 7 * w + 7] = 2.0  # speck in the corner
    raw = foreground(subjects, background, (h, w), morphology=False)[0]
    cleaned = foreground(subjects, background, (h, w))[0]
    assert not raw[3, 3] and raw[7, 7]
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[1:6, 1:6] = True
    assert torch.equal(cleaned, expected)


# --- partition_balanced ------------------------------------------------------------------------


def separated_maps(seed: int, b: int, c: int, n: int) -> torch.Tensor:
    """``[B, C, N]`` maps of size ~1/N where each token has a clear random winner."""
    g = torch.Generator().manual_seed(seed)
    winners = torch.randint(0, c, (b, n), generator=g)
    maps = torch.rand(b, c, n, generator=g)
    maps.scatter_add_(1, winners.unsqueeze(1), torch.ones(b, 1, n))
    return maps / n


def background_map(seed: int, b: int, n: int) -> torch.Tensor:
    return 1.6 * torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) / n


def test_official_partition_without_background_covers_every_token():
    maps = separated_maps(0, 1, 2, 8 * 8)
    out = partition_balanced(maps, None, (8, 8))
    assert isinstance(out, SubjectMasks)
    assert out.masks.shape == (1, 2, 8, 8) and out.masks.dtype == torch.float32
    assert out.grid_hw == (8, 8)
    assert torch.all(out.masks.sum(dim=1) == 1)
    assert not out.background.any()
    assert out.coverage.sum().item() == pytest.approx(1.0)


def test_official_partition_of_planted_halves_with_a_background_band():
    # left: subject 0, right: subject 1, bottom two rows: background
    h, w = 8, 12
    n = h * w
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    maps = torch.ones(1, 2, n)
    maps[0, 0, cols < w // 2] += 1.0
    maps[0, 1, cols >= w // 2] += 1.0
    background = torch.where(rows >= h - 2, 4.0, 0.5).unsqueeze(0)
    out = partition_balanced(maps / n, background / n, (h, w))
    expected0 = torch.zeros(h, w)
    expected0[: h - 2, : w // 2] = 1
    expected1 = torch.zeros(h, w)
    expected1[: h - 2, w // 2 :] = 1
    assert torch.equal(out.masks[0, 0], expected0)
    assert torch.equal(out.masks[0, 1], expected1)
    assert torch.equal(out.background[0], 1 - expected0 - expected1)
    assert out.coverage[0].tolist() == pytest.approx([36 / 96, 36 / 96])


grids = st.tuples(st.integers(1, 9), st.integers(1, 9))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    hw=grids,
    b=st.integers(1, 2),
    c=st.integers(1, 4),
    with_bg=st.booleans(),
    morphology=st.booleans(),
)
def test_masks_are_binary_disjoint_and_cover_exactly_the_foreground(seed, hw, b, c, with_bg, morphology):
    n = hw[0] * hw[1]
    maps = separated_maps(seed, b, c, n)
    bg = background_map(seed + 1, b, n) if with_bg else None
    out = partition_balanced(maps, bg, hw, morphology=morphology)
    fg = foreground(maps, bg, hw, morphology=morphology)
    masks = out.masks
    assert masks.shape == (b, c, *hw) and masks.dtype == torch.float32
    assert torch.all((masks == 0) | (masks == 1))
    assert torch.all(masks.sum(dim=1) <= 1)  # disjoint
    assert torch.equal(masks.sum(dim=1).bool(), fg)  # union == foreground
    assert torch.equal(out.background, 1.0 - fg.float())
    assert torch.allclose(out.coverage.sum(dim=1), fg.float().mean(dim=(1, 2)))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), hw=grids, perm=st.permutations(range(3)), with_bg=st.booleans())
def test_permuting_subjects_permutes_the_masks(seed, hw, perm, with_bg):
    n = hw[0] * hw[1]
    maps = separated_maps(seed, 1, 3, n)
    bg = background_map(seed + 1, 1, n) if with_bg else None
    out = partition_balanced(maps, bg, hw)
    out_perm = partition_balanced(maps[:, list(perm)], bg, hw)
    assert torch.equal(out_perm.masks, out.masks[:, list(perm)])
    assert torch.equal(out_perm.background, out.background)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), hw=grids, c=st.integers(1, 3), scale=st.floats(0.01, 100.0))
def test_batch_rows_are_partitioned_independently(seed, hw, c, scale):
    n = hw[0] * hw[1]
    maps0, bg0 = separated_maps(seed, 1, c, n), background_map(seed, 1, n)
    maps1, bg1 = separated_maps(seed + 7, 1, c, n) * scale, background_map(seed + 7, 1, n) * scale
    alone = partition_balanced(maps0, bg0, hw)
    both = partition_balanced(torch.cat([maps0, maps1]), torch.cat([bg0, bg1]), hw)
    assert torch.equal(both.masks[0], alone.masks[0])
    assert torch.equal(both.background[0], alone.background[0])


def test_sdxl_settings_are_accepted():
    maps = separated_maps(3, 1, 2, 6 * 10)
    params = BalanceParams(gravity=3e-5, spatial=3e-5, anisotropy=1.3, init_norm="tokens")
    out = partition_balanced(maps, None, (6, 10), params=params)
    assert torch.all(out.masks.sum(dim=1) == 1)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError):
        partition_balanced(torch.rand(1, 2, 12), None, (4, 4))
    with pytest.raises(ValueError):
        partition_balanced(torch.rand(1, 2, 12), torch.rand(1, 11), (3, 4))


# --- resize_masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 40), (13, 31), (4, 10), (3, 7), (20, 8)])
def test_nearest_resize_keeps_masks_binary_and_disjoint(size):
    out = partition_balanced(separated_maps(5, 2, 3, 8 * 20), None, (8, 20))
    resized = resize_masks(out.masks, size)
    assert resized.shape == (2, 3, *size) and resized.dtype == torch.float32
    assert torch.all((resized == 0) | (resized == 1))
    assert torch.all(resized.sum(dim=1) == 1)


def test_nearest_upsampling_by_an_integer_factor_repeats_each_cell():
    masks = torch.tensor([[[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]]])  # [1, 1, 2, 3]
    up = resize_masks(masks, (4, 6))
    assert torch.equal(up, masks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert torch.equal(resize_masks(up, (2, 3)), masks)  # and back down


def test_nearest_resize_has_no_half_pixel_shift_on_non_integer_ratios():
    # a mask symmetric under left-right mirroring stays symmetric
    masks = torch.zeros(1, 1, 5, 7)
    masks[..., 1:4, 2:5] = 1
    for size in [(8, 11), (3, 4), (13, 17)]:
        resized = resize_masks(masks, size)
        assert torch.equal(resized, resized.flip(-1))
        assert torch.equal(resized, resized.flip(-2))


def test_bilinear_resize_softens_edges_within_zero_one():
    masks = torch.zeros(1, 2, 4, 6)
    masks[:, 0, :, :3] = 1
    masks[:, 1, :, 3:] = 1
    soft = resize_masks(masks, (8, 15), mode="bilinear")
    assert soft.shape == (1, 2, 8, 15)
    assert soft.min() >= 0 and soft.max() <= 1
    assert ((soft > 0) & (soft < 1)).any()
    assert torch.allclose(soft.sum(dim=1), torch.ones(1, 8, 15))
    with pytest.raises(ValueError):
        resize_masks(masks, (8, 8), mode="bicubic")
