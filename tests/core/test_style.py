"""Subject + style selection with known answers: the divergences, the per-region choice, the token weights it
becomes, the cond decision shared with the uncond rows, and K-LoRA's rule."""

import math

import pytest
import torch

from freefuse.style import (
    choose,
    divergence,
    fused_image_weights,
    fused_text_weights,
    klora_balance,
    klora_ramp,
    klora_score,
    klora_uses_subject,
    region_scores,
    sampled_tokens,
    select,
    select_text,
    share_with_uncond,
)


def _of(deltas):
    """delta_of(owner) over stacked deltas [B, n, A, F]."""
    return lambda owner: deltas[..., owner, :]


def _base(n=16, features=640, seed=0):
    return torch.randn(1, n, features, generator=torch.Generator().manual_seed(seed))


def test_kl_is_half_the_variance_of_the_delta_for_small_deltas_and_quadratic_in_the_multiplier():
    h0 = _base()
    d = 0.05 * torch.randn(h0.shape, generator=torch.Generator().manual_seed(1))
    kl, var = divergence(h0, d, "kl"), divergence(h0, d, "var")
    torch.testing.assert_close(kl, var, rtol=0.02, atol=0)
    ratio = divergence(h0, 1.5 * d, "kl") / kl
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.25), rtol=0.03, atol=0)


def test_every_divergence_is_zero_for_a_zero_delta_and_kl_ignores_a_shift_of_every_channel():
    h0 = _base()
    for metric in ("kl", "var", "l2", "cos"):
        assert divergence(h0, torch.zeros_like(h0), metric).abs().max() < 1e-6, metric
    assert divergence(h0, torch.full_like(h0, 3.0), "kl").abs().max() < 1e-5


def test_the_larger_divergence_wins_in_each_region_and_ties_go_to_the_subject():
    h0 = _base(n=8, features=32)
    small = 0.1 * torch.randn(h0.shape, generator=torch.Generator().manual_seed(2))
    large = 3.0 * small
    regions = torch.zeros(1, 8, 2)
    regions[0, :4, 0] = 1  # subject 0 owns tokens 0-3, subject 1 tokens 4-7
    regions[0, 4:, 1] = 1
    deltas = torch.stack([large, small, small], dim=-2)  # [1, 8, A=3, F]: subject 0 large, subject 1 = style
    u, present = select(h0, _of(deltas), regions, "kl")
    assert u.tolist() == [[1.0, 1.0]] and present.all()  # 0: larger wins; 1: a tie goes to the subject
    deltas = torch.stack([small, small, large], dim=-2)  # the style moves the features more
    assert select(h0, _of(deltas), regions, "kl")[0].tolist() == [[0.0, 0.0]]


def test_a_zero_style_delta_never_wins_and_a_zero_subject_delta_never_wins():
    h0 = _base(n=8, features=32)
    d = 0.2 * torch.randn(h0.shape, generator=torch.Generator().manual_seed(3))
    zero = torch.zeros_like(d)
    regions = torch.ones(1, 8, 1)
    for metric in ("kl", "var", "l2", "cos"):
        assert select(h0, _of(torch.stack([d, zero], -2)), regions, metric)[0].item() == 1.0, metric
        assert select(h0, _of(torch.stack([zero, d], -2)), regions, metric)[0].item() == 0.0, metric


def test_only_a_regions_own_tokens_count_and_an_empty_region_does_not_decide():
    per_token = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
    regions = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    scores, present = region_scores(per_token, regions)
    assert scores[0, 0] == 1.0 and present.tolist() == [[True, False]]
    h0 = _base(n=4, features=8)
    u, decided = select(h0, _of(torch.randn(1, 4, 3, 8)), regions, "l2")
    assert decided.tolist() == [[True, False]] and u[0, 1] == 0.0  # no decision: the background's style


def test_soft_choice_is_the_closed_form_share():
    u = choose(torch.tensor([2.0]), torch.tensor([1.0]), kappa=2.0)
    torch.testing.assert_close(u, torch.tensor([0.8]))
    assert choose(torch.tensor([1.0]), torch.tensor([2.0]), bias=0.5).item() == 1.0  # a bias halves the style


def test_selection_becomes_token_weights_subject_where_it_won_style_everywhere_else():
    masks = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # token 0: subject 0, 1: subject 1, 2: background
    weights = torch.cat([masks, torch.ones(1, 3, 1)], dim=-1)  # style column all ones
    fused = fused_image_weights(weights, torch.tensor([[1.0, 0.0]]))
    assert fused.tolist() == [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]]
    floored = fused_image_weights(weights, torch.tensor([[1.0, 0.0]]), floor=0.25)
    assert floored[0, 0].tolist() == [1.0, 0.0, 0.25]  # the subject won, a quarter of the style stays
    text = fused_text_weights(torch.tensor([[[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]]), torch.tensor([1.0]))
    assert text.tolist() == [[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]]  # subjects (exclusion kept), no style


def test_the_text_side_compares_the_subjects_summed_with_the_style():
    h0 = _base(n=6, features=16)
    d = 0.1 * torch.randn(h0.shape, generator=torch.Generator().manual_seed(4))
    assert select_text(h0, _of(torch.stack([d, d, d], -2)), 2).item() == 1.0  # two subjects summed move further
    assert select_text(h0, _of(torch.stack([d, -d, d], -2)), 2).item() == 0.0  # they cancel: the style wins


def test_the_cond_decision_is_copied_to_the_uncond_rows_of_the_same_image():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two images
    assert share_with_uncond(u, (1, 0)).tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]


def test_sampled_tokens_are_a_bounded_deterministic_stride():
    assert sampled_tokens(10, 4).tolist() == [0, 3, 6, 9] and sampled_tokens(3, 1024).tolist() == [0, 1, 2]
    assert len(sampled_tokens(4096, 1024)) == 1024


@pytest.mark.parametrize(("progress", "s", "s_star"), [(0.0, 0.5, 1.275), (0.1, 0.65, 1.425), (0.5, 1.25, 0.525)])
def test_klora_ramps(progress, s, s_star):
    assert klora_ramp(progress, "s") == pytest.approx(s) and klora_ramp(progress, "s*") == pytest.approx(s_star)


@pytest.mark.parametrize("pattern", ["s", "s*"])
def test_klora_reproduces_its_rule_on_random_weights_at_several_progress_points(pattern):
    gen = torch.Generator().manual_seed(5)
    layers = []
    for _ in range(6):
        rc, rs = 4, 8
        content = torch.randn(32, rc, generator=gen) @ torch.randn(rc, 24, generator=gen)
        style = 0.7 * torch.randn(32, rs, generator=gen) @ torch.randn(rs, 24, generator=gen)
        layers.append((content, style, rc * rs))
    ratios = [float(c.abs().sum() / s.abs().sum()) for c, s, _ in layers]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    gamma = sum(kept) / len(kept)
    assert klora_balance(ratios) == pytest.approx(gamma)
    for progress in (0.05, 0.3, 0.6, 0.95):
        ramp = (1.5 * progress + (1.275 if pattern == "s*" else 0.5)) % (1.5 if pattern == "s*" else math.inf)
        for content, style, k in layers:
            top_c = content.abs().flatten().sort(descending=True).values[:k].sum()
            top_s = style.abs().flatten().sort(descending=True).values[:k].sum()
            expected = bool((top_c / gamma) / (top_s * ramp) > 1)
            got = klora_uses_subject(
                klora_score(content, k), klora_score(style, k), gamma, klora_ramp(progress, pattern)
            )
            assert got == expected


def test_klora_balance_drops_outlier_layers():
    assert klora_balance([1.0, 1.0, 1.0, 100.0]) == pytest.approx(1.0)
    assert klora_balance([]) == 1.0


def _layer_call(rows=4, n_txt=3, n_img=4, features=12):
    """Two images, uncond chunk then cond chunk; subject 0 owns image token 0-1, subject 1 tokens 2-3."""
    weights = torch.ones(rows, n_txt + n_img, 3)
    weights[:, n_txt:, :2] = 0
    weights[:, n_txt : n_txt + 2, 0] = 1
    weights[:, n_txt + 2 :, 1] = 1
    h0 = torch.randn(rows, n_txt + n_img, features, generator=torch.Generator().manual_seed(6))
    return weights, h0


def test_fuse_layer_decides_on_the_cond_rows_and_gives_the_uncond_rows_the_same_weights():
    from freefuse.style import fuse_layer

    weights, h0 = _layer_call()
    cond_rows = torch.tensor([2, 3])
    strength = torch.tensor([[3.0, 0.1, 1.0], [0.1, 0.1, 1.0]])  # per cond image: subject 0, subject 1, style

    def deltas_at(rows, tokens):
        base = torch.ones(len(rows), len(tokens), 3, h0.shape[-1])
        base[..., ::2] = -1  # a delta that changes the softmax
        return _of(base * strength[:, None, :, None])

    fused, u, decided = fuse_layer(weights, h0, deltas_at, layout="joint", n_txt=3, cond_rows=cond_rows, n_chunks=2)
    assert u.tolist() == [[1.0, 0.0], [0.0, 0.0]] and decided.all()
    torch.testing.assert_close(fused[:2], fused[2:])  # uncond rows = cond rows of the same image
    assert fused[2, 3].tolist() == [1.0, 0.0, 0.0]  # image 0, subject 0's token: the subject alone
    assert fused[2, 5].tolist() == [0.0, 0.0, 1.0]  # subject 1 lost: the style there
    assert fused[3, 3].tolist() == [0.0, 0.0, 1.0]
    assert fused[2, 0].tolist() == [1.0, 1.0, 0.0]  # image 0's text: the subjects (3.1) beat the style (1)
    assert fused[3, 0].tolist() == [0.0, 0.0, 1.0]  # image 1's text: the style (1) beats the subjects (0.2)


def test_fixed_weights_for_conv_layers_keep_their_layout():
    from freefuse.style import fixed_weights

    weights = torch.ones(2, 3, 2, 2)  # [rows, A, h, w]
    weights[:, 0, 0] = 1
    weights[:, 0, 1] = 0
    weights[:, 1, 0] = 0
    weights[:, 1, 1] = 1
    fused = fixed_weights(weights, "conv", 0, torch.tensor([1.0, 0.0]), 1.0)
    assert fused.shape == (2, 3, 2, 2)
    assert fused[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0] and fused[0, :, 1, 0].tolist() == [0.0, 0.0, 1.0]


def test_at_tokens_is_rows_then_tokens_in_one_gather():
    from freefuse.style import at_tokens

    t = torch.arange(3 * 5 * 2).reshape(3, 5, 2)
    rows, tokens = torch.tensor([2, 0]), torch.tensor([4, 1, 3])
    assert torch.equal(at_tokens(t, rows, tokens), t[rows][:, tokens])
    view = t.transpose(1, 2)  # a conv layer's [rows, C, h*w] seen as [rows, h*w, C] (not contiguous)
    assert torch.equal(at_tokens(view, rows, torch.tensor([1])), view[rows][:, [1]])
