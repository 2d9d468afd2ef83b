"""Similarity maps refuse bad input with a message that names the problem."""

import pytest
import torch

from freefuse.maps import official_similarity_maps, paper_similarity_maps

# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# Bad input


def _official(**overrides):
    args = dict(
        q_img=torch.randn(1, 2, 6, 4),
        k_txt=torch.randn(1, 2, 5, 4),
        o_img=torch.randn(1, 6, 3),
        subject_positions=[[0], [1, 2]],
        background_positions=None,
        logit_scale=0.5,
    )
    args.update(overrides)
    return official_similarity_maps(**args)


def _paper(**overrides):
    args = dict(
        q_img=torch.randn(1, 2, 6, 4),
        k_img=torch.randn(1, 2, 6, 4),
        subject_positions=[[0], [1, 2]],
        grid_hw=(2, 3),
        q_txt=torch.randn(1, 2, 5, 4),
    )
    args.update(overrides)
    return paper_similarity_maps(**args)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(subject_positions=[]), "subject_positions is empty"),
        (dict(subject_positions=[[0], []]), r"subject_positions\[1\] is empty"),
        (dict(subject_positions=[[0], [5]]), "out of range for 5 text tokens"),
        (dict(subject_positions=[[-1]]), "out of range"),
        (dict(subject_positions=[[0.5]]), "not a token index"),
        (dict(subject_positions="ab"), "one list of token indices per subject"),
        (dict(subject_positions=[3]), r"subject_positions\[0\] must be a sequence of token indices"),
        (dict(background_positions=[]), "background_positions is empty"),
        (dict(background_positions=[7]), "out of range"),
        (dict(q_img=torch.randn(2, 6, 4)), "q_img must be a 4-D tensor"),
        (dict(k_txt=torch.randn(1, 3, 5, 4)), "disagree on batch, heads or head dim"),
        (dict(k_txt=torch.randn(1, 2, 5, 8)), "disagree on batch, heads or head dim"),
        (dict(o_img=torch.randn(1, 7, 3)), "o_img .* does not match q_img"),
        (dict(o_img=torch.randn(2, 6, 3)), "o_img .* does not match q_img"),
        (dict(o_img=torch.randn(6, 3)), "o_img must be a 3-D tensor"),
        (dict(cross_softmax="rows"), "cross_softmax must be"),
        (dict(top_k_ratio=0.0), "top_k_ratio must be in"),
        (dict(temperature=0.0), "temperature must be a positive"),
        (dict(logit_scale=-1.0), "logit_scale must be a positive"),
    ],
)
def test_official_rejects_bad_input_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        _official(**overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(subject_positions=[[0], []]), "is empty"),
        (dict(subject_positions=[[9]]), "out of range for 5 text tokens"),
        (dict(k_img=torch.randn(1, 2, 7, 4)), "must have the same shape"),
        (dict(grid_hw=(3, 3)), "h \\* w == N_img = 6"),
        (dict(grid_hw=(6,)), "grid_hw must be"),
        (dict(grid_hw=(-2, -3)), "grid_hw must be"),
        (dict(q_txt=None), "needs q_txt"),
        (dict(cross_direction="image_to_text"), "needs k_txt"),
        (dict(cross_direction="sideways"), "cross_direction must be"),
        (dict(q_txt=torch.randn(1, 4, 5, 4)), "disagree on batch, heads or head dim"),
        (dict(sink_top_ratio=1.5), "sink_top_ratio must be in"),
        (dict(salient_ratio=0.0), "salient_ratio must be in"),
        (dict(sink_border=-1), "sink_border must be"),
    ],
)
def test_paper_rejects_bad_input_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        _paper(**overrides)
