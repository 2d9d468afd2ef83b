"""Similarity maps on planted-region attention (tests/core/planted.py): the right subject of every image token
is known, so each method's maps must put it first. Formula-level tests are in test_maps.py.
"""

import pytest
import torch

from freefuse.maps import paper_similarity_maps
from tests.core.planted import maps_by_method, planted_case, planted_regions

# --------------------------------------------------------------------------------------------------
# Planted regions: the map of a region's own subject wins inside it

MIN_ACCURACY = 0.9  # fraction of the tokens in each planted region whose argmax-over-subjects is right


def _accuracy_per_row(subject_maps: torch.Tensor, regions: torch.Tensor) -> list[float]:
    """Per batch row: of the tokens inside some planted region, the fraction whose best subject map is it."""
    b, c, h, w = regions.shape
    winner = subject_maps.argmax(dim=1).view(b, h, w)
    result = []
    for row in range(b):
        inside = regions[row].any(dim=0)
        truth = regions[row].float().argmax(dim=0)
        result.append(((winner[row] == truth) & inside).sum().item() / inside.sum().item())
    return result


def test_planted_generator_gives_disjoint_regions_that_move_between_batch_rows():
    for grid in [(16, 16), (12, 20), (20, 12)]:
        for n_subjects in (2, 3, 4):
            for shape in ("rect", "blob"):
                regions = planted_regions(grid, n_subjects, batch=2, shape=shape)
                assert (regions.sum(dim=1) <= 1).all()
                assert 0.5 <= regions.any(dim=1).float().mean().item() <= 0.8
                assert not regions[..., 0, :].any() and not regions[..., :, 0].any()  # edge is background
                for subject in range(n_subjects):
                    assert regions[0, subject].sum() >= 16
                    assert not torch.equal(regions[0, subject], regions[1, subject])
    case = planted_case((16, 16), 2)
    labels = case.labels.view(1, -1)
    assert len(case.sink_tokens) == 2 and (labels[0, case.sink_tokens] == 2).all()


@pytest.mark.parametrize("shape", ["rect", "blob"])
@pytest.mark.parametrize("grid", [(16, 16), (12, 20)])
@pytest.mark.parametrize("n_subjects", [2, 3, 4])
def test_planted_regions_are_won_by_their_own_subject(n_subjects, grid, shape):
    case = planted_case(grid, n_subjects, batch=2, shape=shape, seed=10 * n_subjects + grid[1])
    for name, out in maps_by_method(case).items():
        assert min(_accuracy_per_row(out.subjects, case.regions)) >= MIN_ACCURACY, name


@pytest.mark.parametrize("grid", [(16, 16), (12, 20)])
def test_planted_background_is_won_by_the_background_map(grid):
    case = planted_case(grid, 3, batch=2, shape="blob", seed=7)
    labels = case.labels.view(2, -1)  # subject index, 3 = background
    for name, out in maps_by_method(case).items():
        winner = torch.cat([out.subjects, out.background[:, None]], dim=1).argmax(dim=1)
        assert (winner == labels).float().mean().item() >= MIN_ACCURACY, name


@pytest.mark.parametrize("n_subjects", [2, 3])
def test_sink_filter_removes_planted_attention_sinks(n_subjects):
    # With sinks, the unfiltered top-1 % of every subject's cross map is the sinks, so every subject gets
    # the same salient tokens and the same map: the argmax is then right only for subject 0's region.
    case = planted_case((16, 16), n_subjects, batch=2, sinks=True, seed=8)
    args = (case.q_img, case.k_img, case.subject_positions)
    filtered = paper_similarity_maps(*args, grid_hw=case.grid_hw, q_txt=case.q_txt)
    unfiltered = paper_similarity_maps(*args, grid_hw=case.grid_hw, q_txt=case.q_txt, sink_border=0)
    assert min(_accuracy_per_row(filtered.subjects, case.regions)) >= MIN_ACCURACY
    assert max(_accuracy_per_row(unfiltered.subjects, case.regions)) <= 0.6
    first = unfiltered.subjects[:, :1]
    torch.testing.assert_close(unfiltered.subjects, first.expand_as(unfiltered.subjects))
    # The same case without sinks needs no filter: the damage above comes from the sinks.
    clean = planted_case((16, 16), n_subjects, batch=2, sinks=False, seed=8)
    plain = paper_similarity_maps(
        clean.q_img,
        clean.k_img,
        clean.subject_positions,
        grid_hw=clean.grid_hw,
        q_txt=clean.q_txt,
        sink_border=0,
    )
    assert min(_accuracy_per_row(plain.subjects, clean.regions)) >= MIN_ACCURACY
