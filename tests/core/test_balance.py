"""Stabilised balanced argmax (algorithm.md 1.6) with aspect-aware coordinates and per-row scale."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freefuse.balance import FLUX_BALANCE, SDXL_BALANCE, BalanceParams, balanced_argmax, token_coordinates

FLUX_N = 4096  # maps are softmax distributions of size ~1/N; FLUX at 1024^2 has 4096 tokens


def planted_maps(labels: torch.Tensor, n_subjects: int, *, lead: float, noise: float, seed: int, n_ref: int):
    """Maps ``[1, C, N]`` of size ~1/n_ref: the planted subject leads by ``lead`` (in units of 1/n_ref)."""
    g = torch.Generator().manual_seed(seed)
    n = labels.numel()
    maps = 1.0 + noise * torch.rand(n_subjects, n, generator=g)  # [C, N]
    maps[labels.reshape(-1), torch.arange(n)] += lead
    return (maps / n_ref).unsqueeze(0)


def halves(h: int, w: int, split: str) -> torch.Tensor:
    """``[h, w]`` labels: 0 on the left / top half, 1 on the other."""
    lab = torch.zeros(h, w, dtype=torch.long)
    if split == "left_right":
        lab[:, w // 2 :] = 1
    else:
        lab[h // 2 :, :] = 1
    return lab


# --- coordinates -------------------------------------------------------------------------------


def test_square_grid_coordinates_match_the_official_linspace():
    y, x = token_coordinates(5, 5, anisotropy=1.1)
    assert torch.allclose(y[:, 0], torch.linspace(-1, 1, 5))
    assert torch.allclose(x[0], torch.linspace(-1, 1, 5) * 1.1)


@pytest.mark.parametrize("hw", [(8, 20), (20, 8), (7, 13), (1, 37), (37, 1)])
def test_one_token_step_is_the_same_distance_along_both_axes(hw):
    h, w = hw
    y, x = token_coordinates(h, w, anisotropy=1.0)
    step = 2.0 / (max(h, w) - 1)
    if h > 1:
        assert torch.allclose(y[1:, :] - y[:-1, :], torch.full((h - 1, w), step))
    if w > 1:
        assert torch.allclose(x[:, 1:] - x[:, :-1], torch.full((h, w - 1), step))
    # the longer side spans [-1, 1], both axes are centred
    longest = y if h >= w else x
    assert longest.min().item() == pytest.approx(-1.0) and longest.max().item() == pytest.approx(1.0)
    assert y.mean().item() == pytest.approx(0.0, abs=1e-6) and x.mean().item() == pytest.approx(0.0, abs=1e-6)


def test_anisotropy_stretches_x_only():
    y1, x1 = token_coordinates(6, 10, anisotropy=1.0)
    y2, x2 = token_coordinates(6, 10, anisotropy=1.3)
    assert torch.equal(y1, y2)
    assert torch.allclose(x2, 1.3 * x1)


# --- hand-checked behaviour --------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(4, 4), (1, 11), (7, 13)])
def test_single_subject_owns_every_token(hw):
    n = hw[0] * hw[1]
    out = balanced_argmax(torch.rand(2, 1, n), hw)
    assert out.shape == (2, n) and out.dtype == torch.long
    assert torch.all(out == 0)


def test_zero_iterations_is_the_plain_argmax():
    maps = torch.rand(2, 3, 6 * 9)
    out = balanced_argmax(maps, (6, 9), BalanceParams(iterations=0))
    assert torch.equal(out, maps.argmax(dim=1))


@pytest.mark.parametrize("params", [FLUX_BALANCE, SDXL_BALANCE])
def test_well_separated_regions_come_back_as_the_plain_argmax(params):
    # three vertical stripes of unequal width (4, 6, 8 columns) on a 12 x 18 grid
    labels = torch.zeros(12, 18, dtype=torch.long)
    labels[:, 4:10] = 1
    labels[:, 10:] = 2
    maps = planted_maps(labels, 3, lead=2.0, noise=0.5, seed=0, n_ref=12 * 18)
    out = balanced_argmax(maps, (12, 18), params)
    assert torch.equal(out, maps.argmax(dim=1))
    assert torch.equal(out.view(12, 18), labels)


def test_a_subject_that_leads_everywhere_is_pushed_towards_n_over_c():
    # s0 beats s1 on every token; its lead shrinks from left (0.32) to right (0.02), in units of 1/N
    h, w = 16, 16
    n = h * w
    col = torch.linspace(0, 1, w).expand(h, w).reshape(n)
    s0 = 1.0 + 0.02 + 0.3 * (1 - col)
    s1 = torch.ones(n)
    maps = (torch.stack([s0, s1]) / FLUX_N).unsqueeze(0)  # [1, 2, N]
    assert torch.all(maps.argmax(dim=1) == 0)

    out = balanced_argmax(maps, (h, w))[0]
    count0 = int((out == 0).sum())
    assert count0 < n  # subject 1 got tokens
    assert abs(count0 - n / 2) < n / 2 - 32  # and the split moved well towards N / 2
    cols_of_1 = (out == 1).view(h, w).nonzero()[:, 1].float()
    assert cols_of_1.min() >= w / 2  # subject 1 took the side where subject 0's lead is smallest


@pytest.mark.parametrize("hw", [(8, 20), (20, 8), (7, 13), (13, 7), (16, 16)])
@pytest.mark.parametrize("split", ["left_right", "top_bottom"])
def test_planted_halves_are_split_correctly_on_any_grid(hw, split):
    h, w = hw
    labels = halves(h, w, split)
    maps = planted_maps(labels, 2, lead=0.5, noise=0.2, seed=1, n_ref=FLUX_N)
    out = balanced_argmax(maps, hw)
    assert torch.equal(out.view(h, w), labels)


@pytest.mark.parametrize("n", [2, 37, 64])
def test_a_one_row_grid_is_split_correctly(n):
    labels = halves(1, n, "left_right")
    maps = planted_maps(labels, 2, lead=0.5, noise=0.2, seed=2, n_ref=FLUX_N)
    assert torch.equal(balanced_argmax(maps, (1, n)).view(1, n), labels)
    assert torch.equal(balanced_argmax(maps.reshape(1, 2, n), (n, 1)).view(1, n), labels)  # one column


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("hw", "cut_across"), [((8, 20), "columns"), ((20, 8), "rows"), ((12, 12), "columns")])
def test_without_signal_gravity_cuts_the_true_geometry_across_its_long_side(seed, hw, cut_across):
    # Near-flat maps: gravity and balancing decide. In true (aspect-aware) geometry two compact halves
    # of a wide grid sit side by side; of a tall grid, one above the other; a square grid is cut
    # left / right because anisotropy stretches x. (The official per-axis [-1, 1] coordinates cut the
    # 8 x 20 grid top / bottom instead.)
    h, w = hw
    g = torch.Generator().manual_seed(seed)
    maps = (1.0 + 0.01 * torch.rand(1, 2, h * w, generator=g)) / FLUX_N
    out = balanced_argmax(maps, hw)[0].view(h, w)
    lines = out.T if cut_across == "columns" else out  # each column (row) belongs to one subject
    assert all(line.unique().numel() == 1 for line in lines)
    assert abs(int((out == 0).sum()) - h * w / 2) <= lines.shape[1]  # halves, to within one line


def test_border_penalty_cannot_change_the_result():
    # It is the same for every subject at a token, and the loop normalises over subjects.
    maps = torch.rand(1, 3, 10 * 10) / 100
    plain = balanced_argmax(maps, (10, 10))
    penalised = balanced_argmax(maps, (10, 10), BalanceParams(border_penalty=1.0))
    assert torch.equal(plain, penalised)


def test_bad_grid_and_bad_params_are_rejected():
    with pytest.raises(ValueError, match="does not hold"):
        balanced_argmax(torch.rand(1, 2, 12), (3, 5))
    with pytest.raises(ValueError):
        balanced_argmax(torch.rand(2, 12), (3, 4))
    with pytest.raises(ValueError):
        BalanceParams(momentum=1.5)
    with pytest.raises(ValueError):
        BalanceParams(init_norm="pixels")


# --- properties --------------------------------------------------------------------------------


def random_maps(seed: int, b: int, c: int, n: int, scale: float) -> torch.Tensor:
    """Well-separated random maps: each token has a clear random winner."""
    g = torch.Generator().manual_seed(seed)
    winners = torch.randint(0, c, (b, n), generator=g)
    maps = torch.rand(b, c, n, generator=g)
    maps.scatter_add_(1, winners.unsqueeze(1), torch.full((b, 1, n), 1.0))
    return maps * scale / n


grids = st.tuples(st.integers(1, 9), st.integers(1, 9))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    hw=grids,
    c=st.integers(2, 4),
    other_scale=st.floats(0.01, 100.0),
    init=st.sampled_from(["subjects", "tokens"]),
)
def test_batch_rows_are_independent(seed, hw, c, other_scale, init):
    n = hw[0] * hw[1]
    params = BalanceParams(init_norm=init)
    row0 = random_maps(seed, 1, c, n, 1.0)
    row1 = random_maps(seed + 1, 1, c, n, other_scale)
    alone = balanced_argmax(row0, hw, params)
    together = balanced_argmax(torch.cat([row0, row1]), hw, params)
    assert torch.equal(together[0], alone[0])
    assert torch.equal(together[1], balanced_argmax(row1, hw, params)[0])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), hw=grids, perm=st.permutations(range(4)))
def test_permuting_subjects_permutes_the_assignment(seed, hw, perm):
    n = hw[0] * hw[1]
    maps = random_maps(seed, 2, 4, n, 1.0)
    out = balanced_argmax(maps, hw)
    out_perm = balanced_argmax(maps[:, list(perm)], hw)
    # subject perm[j] of the original is subject j of the permuted input
    inverse = torch.argsort(torch.tensor(perm))
    assert torch.equal(inverse[out], out_perm)
