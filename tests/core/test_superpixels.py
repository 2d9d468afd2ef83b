"""Superpixel voting (paper Eq. 11-13) and the paper partition built on it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freefuse.partition import partition_superpixels
from freefuse.superpixels import default_n_segments, majority_to_grid, vote_superpixels, winner_per_superpixel

RED = (0.85, 0.2, 0.2)
BLUE = (0.2, 0.3, 0.85)
GREEN = (0.2, 0.8, 0.3)


def banded_image(colours, height=64, width=96, noise=0.01, seed=0) -> torch.Tensor:
    """``[1, 3, H, W]`` image of equal vertical colour bands plus a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    img = torch.empty(1, 3, height, width)
    edges = [round(i * width / len(colours)) for i in range(len(colours) + 1)]
    for colour, x0, x1 in zip(colours, edges[:-1], edges[1:], strict=True):
        img[0, :, :, x0:x1] = torch.tensor(colour).view(3, 1, 1)
    return (img + noise * torch.randn(img.shape, generator=g)).clamp(0, 1)


def noisy_half_maps(h: int, w: int, flip: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps ``[1, 2, N]`` that favour subject 0 on the left, 1 on the right; a ``flip`` share of tokens lies."""
    g = torch.Generator().manual_seed(seed)
    n = h * w
    truth = torch.zeros(h, w, dtype=torch.long)
    truth[:, w // 2 :] = 1
    flat = truth.reshape(n)
    told = torch.where(torch.rand(n, generator=g) < flip, 1 - flat, flat)
    maps = torch.rand(1, 2, n, generator=g)
    maps[0, told, torch.arange(n)] += 0.5
    return maps / n, truth


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a & b).sum() / (a | b).sum()).item()


# --- pieces ------------------------------------------------------------------------------------


def test_default_segment_count_is_the_square_root_of_the_image_area():
    assert default_n_segments(1024, 1024) == 1024
    assert default_n_segments(64, 96) == 78
    assert default_n_segments(1, 1) == 1


def test_each_superpixel_goes_to_the_channel_with_the_largest_sum():
    segments = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1]])
    scores = torch.zeros(2, 2, 4)
    scores[0] = torch.tensor([[0.75, 0.0, 0.25, 0.25], [0.0, 0.5, 0.5, 0.25]])
    scores[1] = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.25, 0.5, 0.5, 0.5]])
    # sums: segment 0 -> (0.75, 0.75) tie -> channel 0; segment 1 -> (0.75, 1.5) -> 1; segment 2 -> tie -> 0
    labels = winner_per_superpixel(scores, segments)
    assert labels.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


def test_majority_per_grid_cell_with_a_non_integer_ratio():
    # 5 pixel columns onto 2 cells: columns 0-2 -> cell 0, columns 3-4 -> cell 1
    labels = torch.tensor([[[1, 1, 0, 0, 0], [1, 0, 0, 2, 2]]])  # [1, 2, 5]
    out = majority_to_grid(labels, (1, 2), n_labels=3)
    # cell 0: 1,1,0,1,0,0 -> tie 3:3 between 0 and 1 -> 0 (lower label); cell 1: 0,0,2,2 -> tie -> 0
    assert out.tolist() == [[[0, 0]]]
    labels[0, 1, 1] = 1
    assert majority_to_grid(labels, (1, 2), n_labels=3).tolist() == [[[1, 0]]]


def test_image_smaller_than_the_grid_is_rejected():
    with pytest.raises(ValueError, match="smaller"):
        majority_to_grid(torch.zeros(1, 4, 4, dtype=torch.long), (8, 8), n_labels=2)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 4), n_segments=st.sampled_from([None, 10, 40]))
def test_every_superpixel_is_assigned_whole(seed, k, n_segments):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(48, 64), mode="bilinear")
    scores = torch.rand(1, k, 6, 8, generator=g)
    vote = vote_superpixels(scores, image, n_segments=n_segments)
    seg, lab = vote.segments[0], vote.pixel_labels[0]
    assert seg.shape == lab.shape == (48, 64)
    for s in seg.unique():
        assert lab[seg == s].unique().numel() == 1
    assert vote.grid_labels.shape == (1, 6, 8)
    assert vote.grid_labels.min() >= 0 and vote.grid_labels.max() < k


# --- partition_superpixels ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_superpixels_recover_two_coloured_halves_from_noisy_maps(seed):
    h, w = 16, 24  # 4 x 4 pixel token cells on a 64 x 96 image
    maps, truth = noisy_half_maps(h, w, flip=0.1, seed=seed)
    image = banded_image([RED, BLUE], seed=seed)
    out = partition_superpixels(maps, None, (h, w), image, n_segments=24)
    masks = out.masks[0].bool()
    assert out.grid_hw == (h, w)
    assert torch.all(out.masks.sum(dim=1) == 1) and not out.background.any()
    assert iou(masks[0], truth == 0) >= 0.95 and iou(masks[1], truth == 1) >= 0.95
    plain = maps[0].argmax(dim=0).view(h, w)
    assert iou(plain == 0, truth == 0) < 0.8  # the per-token argmax alone is far worse


def test_default_superpixels_clean_up_most_of_the_noise():
    h, w = 16, 24
    scores = []
    for seed in range(3):
        maps, truth = noisy_half_maps(h, w, flip=0.1, seed=seed)
        out = partition_superpixels(maps, None, (h, w), banded_image([RED, BLUE], seed=seed))
        masks = out.masks[0].bool()
        scores.append(min(iou(masks[0], truth == 0), iou(masks[1], truth == 1)))
    assert sum(scores) / len(scores) >= 0.85


def test_superpixels_won_by_the_background_belong_to_no_subject():
    # red | green | blue bands; subjects favour the outer bands, the background map the middle one
    h, w = 12, 18
    n = h * w
    cols = torch.arange(w).repeat(h)
    band = (cols * 3) // w  # 0, 1, 2
    maps = torch.full((1, 2, n), 1.0)
    maps[0, 0, band == 0] = 3.0
    maps[0, 1, band == 2] = 3.0
    background = torch.where(band == 1, 3.0, 0.5).unsqueeze(0)
    image = banded_image([RED, GREEN, BLUE], height=48, width=72)
    out = partition_superpixels(maps / n, background / n, (h, w), image)
    assert torch.equal(out.masks[0, 0].bool(), (band == 0).view(h, w))
    assert torch.equal(out.masks[0, 1].bool(), (band == 2).view(h, w))
    assert torch.equal(out.background[0].bool(), (band == 1).view(h, w))


def test_batch_rows_are_voted_independently():
    h, w = 8, 12
    maps0, _ = noisy_half_maps(h, w, flip=0.1, seed=0)
    maps1, _ = noisy_half_maps(h, w, flip=0.4, seed=1)
    img0 = banded_image([RED, BLUE], height=32, width=48, seed=0)
    img1 = banded_image([GREEN, RED], height=32, width=48, seed=1)
    alone = partition_superpixels(maps0, None, (h, w), img0)
    both = partition_superpixels(torch.cat([maps0, maps1]), None, (h, w), torch.cat([img0, img1]))
    assert torch.equal(both.masks[0], alone.masks[0])


def test_bad_image_shapes_are_rejected():
    maps = torch.rand(1, 2, 4 * 4)
    with pytest.raises(ValueError):
        partition_superpixels(maps, None, (4, 4), torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError):
        partition_superpixels(maps, None, (4, 4), torch.rand(2, 3, 32, 32))


def test_latent_to_rgb_keeps_regions_apart_for_slic():
    from freefuse.superpixels import latent_to_rgb

    # a 16-channel latent whose left and right halves differ along one random direction
    direction = torch.randn(16)
    latent = torch.randn(2, 16, 12, 20) * 0.05
    latent[:, :, :, 10:] += direction[None, :, None, None]
    rgb = latent_to_rgb(latent)
    assert rgb.shape == (2, 3, 12, 20) and float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0
    gap = (rgb[:, :, :, :10].mean(dim=(2, 3)) - rgb[:, :, :, 10:].mean(dim=(2, 3))).abs().amax(dim=1)
    assert bool((gap > 0.8).all())  # the first component separates the halves almost fully
