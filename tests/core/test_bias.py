"""Attention bias: hand-checked entries, signs, directions, batching, CFG rows and block presets."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freefuse.bias import (
    bias_blocks,
    bias_for_call,
    cross_attention_bias,
    joint_attention_bias,
    token_owner,
)

# Tiny case: T=5 text tokens, N=4 image tokens.
# Subject A owns text 0, 1 and image 0, 1; subject B owns text 3 and image 2; text 2, 4 and image 3 are free.
N_TXT = 5
POSITIONS = [[0, 1], [3]]
MASKS = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])  # [B=1, C=2, N=4]
NEG, POS = 4.0, 2.0

# fmt: off
# rows = queries, columns = keys, both in joint order [t0 t1 t2 t3 t4 | i0 i1 i2 i3]
EXPECTED_JOINT = torch.tensor([
    #  t0    t1   t2   t3   t4 |  i0    i1    i2    i3
    [0.0,  0.0, 0.0, 0.0, 0.0,  2.0,  2.0, -4.0, -4.0],  # t0 (A): towards A's region, away from the rest
    [0.0,  0.0, 0.0, 0.0, 0.0,  2.0,  2.0, -4.0, -4.0],  # t1 (A)
    [0.0,  0.0, 0.0, 0.0, 0.0,  0.0,  0.0,  0.0,  0.0],  # t2 (no subject): never biased
    [0.0,  0.0, 0.0, 0.0, 0.0, -4.0, -4.0,  2.0, -4.0],  # t3 (B)
    [0.0,  0.0, 0.0, 0.0, 0.0,  0.0,  0.0,  0.0,  0.0],  # t4 (no subject)
    [2.0,  2.0, 0.0, -4.0, 0.0, 0.0,  0.0,  0.0,  0.0],  # i0 (A region): +A tokens, -B tokens
    [2.0,  2.0, 0.0, -4.0, 0.0, 0.0,  0.0,  0.0,  0.0],  # i1 (A region)
    [-4.0, -4.0, 0.0, 2.0, 0.0, 0.0,  0.0,  0.0,  0.0],  # i2 (B region)
    [0.0,  0.0, 0.0, 0.0, 0.0,  0.0,  0.0,  0.0,  0.0],  # i3 (background): no bias
])
# fmt: on


def _joint(masks=MASKS, positions=POSITIONS, **kwargs):
    options = {"neg_scale": NEG, "pos_scale": POS, **kwargs}
    return joint_attention_bias(masks, positions, N_TXT, **options)


# --- token_owner ----------------------------------------------------------------------------------


def test_token_owner_marks_each_subjects_positions():
    assert token_owner(POSITIONS, N_TXT).tolist() == [0, 0, -1, 1, -1]
    assert token_owner([[], [2, 2]], 3).tolist() == [-1, -1, 1]


def test_token_owner_rejects_a_position_claimed_twice():
    with pytest.raises(ValueError, match="claimed"):
        token_owner([[0, 1], [1]], N_TXT)


@pytest.mark.parametrize("bad", [-1, N_TXT])
def test_token_owner_rejects_positions_outside_the_text(bad):
    with pytest.raises(ValueError):
        token_owner([[bad]], N_TXT)


# --- joint bias (FLUX) ----------------------------------------------------------------------------


def test_joint_bias_hand_checked_entries():
    bias = _joint()
    assert bias.shape == (1, 9, 9) and bias.dtype == torch.float32
    torch.testing.assert_close(bias[0], EXPECTED_JOINT)


def test_without_positive_bias_only_the_negative_entries_remain():
    torch.testing.assert_close(_joint(positive=False)[0], EXPECTED_JOINT.clamp(max=0.0))


def test_without_bidirectional_the_text_rows_are_zero():
    expected = EXPECTED_JOINT.clone()
    expected[:N_TXT] = 0.0
    torch.testing.assert_close(_joint(bidirectional=False)[0], expected)


def test_scales_set_the_magnitudes():
    bias = joint_attention_bias(MASKS, POSITIONS, N_TXT, neg_scale=3.0, pos_scale=0.5)
    image_to_text = bias[0, N_TXT:, :N_TXT]
    assert set(image_to_text.unique().tolist()) == {-3.0, 0.0, 0.5}


def test_each_batch_row_uses_its_own_masks():
    swapped = MASKS.flip(1)  # row 1: A gets image 2, B gets images 0, 1
    masks = torch.cat([MASKS, swapped])  # [B=2, C=2, N=4]
    bias = _joint(masks)
    torch.testing.assert_close(bias[0], _joint(MASKS)[0])
    torch.testing.assert_close(bias[1], _joint(swapped)[0])
    assert not torch.equal(bias[0], bias[1])


def test_all_zero_mask_gives_no_image_to_text_bias_for_that_subject():
    masks = MASKS.clone()
    masks[0, 0] = 0.0  # subject A has no region
    bias = _joint(masks)
    image_to_text = bias[0, N_TXT:, :N_TXT]  # [N, T]
    # only B's region (image 2) is biased: -4 on A's tokens, +2 on B's
    assert image_to_text[[0, 1, 3]].abs().sum() == 0
    torch.testing.assert_close(image_to_text[2], torch.tensor([-4.0, -4.0, 0.0, 2.0, 0.0]))
    assert (image_to_text[:, [0, 1]] <= 0).all()  # nothing pulls an image token towards A's tokens


def test_subject_without_text_positions_is_only_pushed_away_from_others():
    bias = _joint(positions=[[0, 1], []])  # B's phrase filtered to nothing: its region still avoids A
    image_to_text = bias[0, N_TXT:, :N_TXT]
    torch.testing.assert_close(image_to_text[2], torch.tensor([-4.0, -4.0, 0.0, 0.0, 0.0]))
    assert bias[0, 3, N_TXT:].abs().sum() == 0  # text 3 no longer belongs to anyone


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        _joint(positions=[[0]])  # 2 masks, 1 subject
    with pytest.raises(ValueError):
        _joint(masks=MASKS[0])


def test_cross_attention_bias_is_the_image_to_text_block():
    cross = cross_attention_bias(MASKS, POSITIONS, N_TXT, neg_scale=NEG, pos_scale=POS)
    assert cross.shape == (1, 4, N_TXT)
    torch.testing.assert_close(cross[0], EXPECTED_JOINT[N_TXT:, :N_TXT])
    no_positive = cross_attention_bias(MASKS, POSITIONS, N_TXT, neg_scale=NEG, pos_scale=POS, positive=False)
    torch.testing.assert_close(no_positive[0], EXPECTED_JOINT[N_TXT:, :N_TXT].clamp(max=0.0))


def test_softmax_with_bias_moves_image_attention_to_its_own_subject_tokens():
    n_txt, n_img = 8, 6
    positions = [[1, 2], [5, 6]]
    masks = torch.tensor([[[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]]])
    logits = torch.randn(1, n_txt + n_img, n_txt + n_img)
    bias = joint_attention_bias(masks, positions, n_txt, neg_scale=4.0, pos_scale=2.0)
    before = logits.softmax(-1)[0]
    after = (logits + bias).softmax(-1)[0]
    for subject, own, other in ((0, [1, 2], [5, 6]), (1, [5, 6], [1, 2])):
        rows = n_txt + torch.nonzero(masks[0, subject]).flatten()
        assert (after[rows][:, own].sum(-1) > before[rows][:, own].sum(-1)).all()
        assert (after[rows][:, other].sum(-1) < before[rows][:, other].sum(-1)).all()
        # the subject's text tokens look more at its region
        region = n_txt + torch.nonzero(masks[0, subject]).flatten()
        for t in own:
            assert after[t, region].sum() > before[t, region].sum()


@st.composite
def _subjects(draw):
    n_subjects = draw(st.integers(2, 4))
    n_txt = draw(st.integers(n_subjects, 10))
    n_img = draw(st.integers(1, 9))
    batch = draw(st.integers(1, 2))
    owners = draw(st.lists(st.integers(-1, n_subjects - 1), min_size=n_txt, max_size=n_txt))
    positions = [[t for t, o in enumerate(owners) if o == c] for c in range(n_subjects)]
    bits = draw(st.lists(st.booleans(), min_size=batch * n_subjects * n_img, max_size=batch * n_subjects * n_img))
    masks = torch.tensor(bits, dtype=torch.float32).reshape(batch, n_subjects, n_img)
    order = draw(st.permutations(range(n_subjects)))
    flags = draw(st.fixed_dictionaries({"positive": st.booleans(), "bidirectional": st.booleans()}))
    return masks, positions, n_txt, list(order), flags


@settings(max_examples=40, deadline=None)
@given(_subjects())
def test_permuting_subjects_with_their_positions_leaves_the_bias_unchanged(case):
    masks, positions, n_txt, order, flags = case
    bias = joint_attention_bias(masks, positions, n_txt, neg_scale=3.0, pos_scale=1.5, **flags)
    permuted = joint_attention_bias(
        masks[:, order], [positions[c] for c in order], n_txt, neg_scale=3.0, pos_scale=1.5, **flags
    )
    torch.testing.assert_close(permuted, bias)


@settings(max_examples=40, deadline=None)
@given(_subjects())
def test_bias_is_zero_within_text_and_within_image_and_on_free_text(case):
    masks, positions, n_txt, _, flags = case
    bias = joint_attention_bias(masks, positions, n_txt, neg_scale=3.0, pos_scale=1.5, **flags)
    assert bias[:, :n_txt, :n_txt].abs().sum() == 0
    assert bias[:, n_txt:, n_txt:].abs().sum() == 0
    free = [t for t in range(n_txt) if not any(t in p for p in positions)]
    assert bias[:, free, :].abs().sum() == 0
    assert bias[:, :, free].abs().sum() == 0


# --- CFG rows -------------------------------------------------------------------------------------


def test_bias_for_call_zeroes_the_uncond_chunks():
    bias = _joint(torch.cat([MASKS, MASKS.flip(1)]))  # B_img = 2
    zeros = torch.zeros_like(bias)

    uncond_first = bias_for_call(bias, [1, 0])
    assert uncond_first.shape == (4, 9, 9)
    torch.testing.assert_close(uncond_first, torch.cat([zeros, bias]))

    torch.testing.assert_close(bias_for_call(bias, [0]), bias)
    torch.testing.assert_close(bias_for_call(bias, [0, 1]), torch.cat([bias, zeros]))


@pytest.mark.parametrize("flags", [[], [2], [0, -1]])
def test_bias_for_call_rejects_unknown_flags(flags):
    with pytest.raises(ValueError):
        bias_for_call(_joint(), flags)


# --- blocks ---------------------------------------------------------------------------------------


def test_block_presets_for_flux():
    all_double, all_single = frozenset(range(19)), frozenset(range(38))
    assert bias_blocks("all", 19, 38) == (all_double, all_single)
    assert bias_blocks("double_stream_only", 19, 38) == (all_double, frozenset())
    assert bias_blocks("single_stream_only", 19, 38) == (frozenset(), all_single)
    assert bias_blocks("last_half_double", 19, 38) == (frozenset(range(10, 19)), frozenset())
    assert bias_blocks("none", 19, 38) == (frozenset(), frozenset())


def test_explicit_block_lists():
    assert bias_blocks("double:0-18,single:0-37", 19, 38) == (frozenset(range(19)), frozenset(range(38)))
    assert bias_blocks("double:0,2, 5-6 ,single:3", 19, 38) == (frozenset({0, 2, 5, 6}), frozenset({3}))
    assert bias_blocks("transformer_blocks.18", 19, 38) == (frozenset({18}), frozenset())
    assert bias_blocks("single_transformer_blocks.4", 19, 38) == (frozenset(), frozenset({4}))


@pytest.mark.parametrize(
    "spec", ["", "some_preset", "double:0-19", "single:38", "3-4", "double:5-2", "double:a", "triple:1"]
)
def test_bad_block_specs_list_the_accepted_forms(spec):
    with pytest.raises(ValueError, match="accepted forms|outside"):
        bias_blocks(spec, 19, 38)


def test_a_calls_bias_repeats_cond_positions_with_the_text_and_leaves_uncond_rows_alone():
    from freefuse.bias import call_bias_factors

    def call_attention_bias(*args, **kwargs):
        return call_bias_factors(*args, **kwargs).dense()

    masks = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, C=2, N=2]
    cross = call_attention_bias(
        "cross", masks, [[0], [1]], 2, 4, (1, 0), neg_scale=1.0, pos_scale=2.0, positive=True
    )  # cond text of 2 tokens repeated to 4; uncond chunk first
    assert cross.shape == (2, 2, 4)
    assert cross[0].abs().sum() == 0
    assert cross[1, 0].tolist() == [2.0, -1.0, 2.0, -1.0]  # image token 0 belongs to subject 0
    joint = call_attention_bias("joint", masks, [[0], [1]], 2, 2, (0,), neg_scale=1.0, pos_scale=2.0)
    assert torch.equal(joint[0, 2:, :2], cross[1, :, :2])
    with pytest.raises(ValueError, match="joint' or 'cross"):
        call_attention_bias("diagonal", masks, [[0], [1]], 2, 2, (0,), neg_scale=1.0, pos_scale=2.0)
