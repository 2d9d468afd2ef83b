"""Similarity maps from attention: the official method (algorithm.md 1.4, 2.2) and the paper's (Eq. 5-10).

Three kinds of test: each formula step on a case small enough to check by hand; both public functions
against a naive reference that forms the full N x N matrices (allowed at these sizes); and planted-region
attention (tests/core/planted.py) where the right subject of every image token is known.
"""

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from freefuse import maps
from freefuse.maps import SimilarityMaps, official_similarity_maps, paper_similarity_maps
from tests.core.planted import maps_by_method, planted_case

LN2 = math.log(2.0)


def _qk(values: list[float]) -> torch.Tensor:  # one head, D = 1: [1, 1, len, 1]
    return torch.tensor(values, dtype=torch.float32).view(1, 1, -1, 1)


# --------------------------------------------------------------------------------------------------
# Official method, step by step


def test_image_softmax_spreads_each_concept_token_over_the_image_tokens():
    # q_img = [0, 1, 2, 3], k = [+1, -1], scale ln 2: column 0 ~ 2^x, column 1 ~ 2^-x over the image tokens.
    s = maps._official_cross_scores(_qk([0, 1, 2, 3]), _qk([1, -1]), [[0], [1], [0, 1]], LN2, "image")
    assert s.shape == (1, 3, 4)
    torch.testing.assert_close(s[0, 0], torch.tensor([1.0, 2, 4, 8]) / 15)
    torch.testing.assert_close(s[0, 1], torch.tensor([8.0, 4, 2, 1]) / 15)
    torch.testing.assert_close(s[0, 2], torch.tensor([9.0, 6, 6, 9]) / 30)  # mean of the subject's tokens


def test_cross_score_is_the_plain_mean_of_the_per_head_distributions():
    q = torch.cat([_qk([0, 1, 2, 3]), _qk([0, 0, 0, 0])], dim=1)  # head 1 attends uniformly
    k = torch.cat([_qk([1, -1]), _qk([1, -1])], dim=1)
    s = maps._official_cross_scores(q, k, [[0]], LN2, "image")
    torch.testing.assert_close(s[0, 0], (torch.tensor([1.0, 2, 4, 8]) / 15 + 0.25) / 2)


def test_text_softmax_normalises_over_all_text_keys_then_takes_the_columns():
    # Row i over the 2 text keys: [2^x, 2^-x] / sum, column 0 = 4^x / (4^x + 1).
    s = maps._official_cross_scores(_qk([0, 1, 2, 3]), _qk([1, -1]), [[0]], LN2, "text")
    torch.testing.assert_close(s[0, 0], torch.tensor([1 / 2, 4 / 5, 16 / 17, 64 / 65]))


def test_text_softmax_includes_text_tokens_outside_every_subject():
    # A third key (not a subject token) takes its share of every image row.
    s = maps._official_cross_scores(_qk([0, 1]), _qk([1, -1, 0]), [[0]], LN2, "text")
    torch.testing.assert_close(s[0, 0], torch.tensor([1 / 3, 2 / (2 + 0.5 + 1)]))


def test_contrastive_score_is_c_times_own_minus_the_others():
    s = torch.tensor([[[0.5, 0.1], [0.2, 0.3], [0.3, 0.6]]])  # [B=1, C=3, N=2]
    c = maps._contrastive_scores(s)
    torch.testing.assert_close(c[0, 0], torch.tensor([3 * 0.5 - 0.2 - 0.3, 3 * 0.1 - 0.3 - 0.6]))
    torch.testing.assert_close(c[0, 2], torch.tensor([3 * 0.3 - 0.5 - 0.2, 3 * 0.6 - 0.1 - 0.3]))


@pytest.mark.parametrize(("ratio", "count"), [(0.1, 1), (0.05, 1), (0.25, 2), (0.39, 3), (0.5, 5)])
def test_core_holds_max_1_floor_n_ratio_tokens_with_the_highest_scores(ratio, count):
    # N = 10, one-hot attention outputs: the map is higher exactly on the core tokens.
    n = 10
    q = _qk([float(i) for i in range(n)])  # image token i scores 2^i for the subject: core = the last ones
    out = official_similarity_maps(
        q, _qk([1.0]), torch.eye(n).unsqueeze(0), [[0]], logit_scale=LN2, top_k_ratio=ratio, temperature=0.01
    )
    m = out.subjects[0, 0]
    core = (m > m.min() * 1.5).nonzero().flatten().tolist()
    assert core == list(range(n - count, n))


def test_core_follows_the_contrastive_score_not_the_own_score():
    # Both subjects attend most to token 3, subject 0 also to token 2; its contrastive winner is token 2.
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [3.0, 3.0]]).view(1, 1, 4, 2)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    out = official_similarity_maps(
        q, k, torch.eye(4).unsqueeze(0), [[0], [1]], logit_scale=1.0, top_k_ratio=0.25, temperature=0.01
    )
    assert out.subjects[0].argmax(dim=-1).tolist() == [2, 3]


def test_background_takes_its_own_top_tokens_without_contrast():
    # The background key matches the same tokens as subject 1; with contrast it would lose them.
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]).view(1, 1, 4, 2)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]).view(1, 1, 3, 2)
    out = official_similarity_maps(
        q, k, torch.eye(4).unsqueeze(0), [[0], [1]], [2], logit_scale=1.0, top_k_ratio=0.25, temperature=0.01
    )
    assert out.background is not None and out.background.shape == (1, 4)
    assert out.background[0].argmax().item() == 3
    without = official_similarity_maps(
        q, k, torch.eye(4).unsqueeze(0), [[0], [1]], logit_scale=1.0, top_k_ratio=0.25, temperature=0.01
    )
    assert without.background is None
    torch.testing.assert_close(out.subjects, without.subjects)  # background is not in the contrast


def test_concept_attention_equals_the_explicit_n_by_n_computation():
    gen = torch.Generator().manual_seed(1)
    o = torch.randn(2, 7, 5, generator=gen)  # [B, N, F]
    scores = torch.randn(2, 3, 7, generator=gen)  # [B, S, N]
    got = maps._concept_attention(o, scores, k=3, temperature=2.0)
    for b in range(2):
        gram = o[b] @ o[b].T  # [N, N], fine at N = 7
        for s in range(3):
            core = scores[b, s].argsort(descending=True)[:3]
            expected = (gram[core].mean(dim=0) / 2.0).softmax(dim=0)
            torch.testing.assert_close(got[b, s], expected)


def test_higher_temperature_flattens_the_map_without_reordering_it():
    case = planted_case((8, 8), 2, seed=2)
    args = (case.q_img, case.k_txt, case.o_img, case.subject_positions)
    entropies, orders = [], []
    for tau in (case.temperature / 4, case.temperature, case.temperature * 4):
        m = official_similarity_maps(*args, logit_scale=case.logit_scale, temperature=tau).subjects[0, 0]
        entropies.append(-(m * m.log()).sum().item())
        orders.append(m.argsort())
    assert entropies[0] < entropies[1] < entropies[2] < math.log(64)
    assert all(torch.equal(o, orders[0]) for o in orders)
    flat = official_similarity_maps(*args, logit_scale=case.logit_scale, temperature=1e12).subjects
    torch.testing.assert_close(flat, torch.full_like(flat, 1 / 64))


# --------------------------------------------------------------------------------------------------
# Paper method, step by step


def test_border_tokens_are_those_within_the_border_of_the_grid_edge():
    border = maps._border_tokens((3, 4), 1, torch.device("cpu")).view(3, 4)
    assert border.tolist() == [[True] * 4, [True, False, False, True], [True] * 4]
    assert not maps._border_tokens((3, 4), 0, torch.device("cpu")).any()
    assert maps._border_tokens((4, 5), 2, torch.device("cpu")).all()


def test_sink_filter_zeroes_exactly_the_top_k_entries_on_the_border():
    border = maps._border_tokens((3, 3), 1, torch.device("cpu"))  # only token 4 (the centre) is inside
    row = torch.tensor([0.30, 0.05, 0.05, 0.05, 0.25, 0.05, 0.05, 0.05, 0.15])
    # k = 2: the top two are token 0 (border) and token 4 (centre); only token 0 goes.
    got = maps._sink_filter(row, border, k=2)
    expected = row.clone()
    expected[0] = 0.0
    torch.testing.assert_close(got, expected / 0.70)
    # k = 3 also reaches token 8 (border): tokens 0 and 8 go.
    got = maps._sink_filter(row, border, k=3)
    expected[8] = 0.0
    torch.testing.assert_close(got, expected / 0.55)


def test_sink_filter_normalises_a_row_it_would_empty_without_filtering_it():
    border = torch.tensor([True, True])
    torch.testing.assert_close(maps._sink_filter(torch.tensor([[2.0, 0.0]]), border, k=1), torch.tensor([[1.0, 0.0]]))


def test_sink_filter_normalises_rows_that_are_not_distributions():
    border = torch.tensor([False, False, False])
    torch.testing.assert_close(
        maps._sink_filter(torch.tensor([1.0, 2.0, 1.0]), border, k=1), torch.tensor([0.25, 0.5, 0.25])
    )


def test_image_to_text_rows_are_text_softmax_columns_renormalised_over_the_image():
    # q_img = [0, 1], k_txt = [+1, -1], D = 1: column 0 of the text softmax is [1/2, e^2/(e^2+1)].
    no_border = torch.zeros(2, dtype=torch.bool)
    rows = maps._paper_cross_maps(_qk([0, 1]), _qk([0, 1]), None, _qk([1, -1]), [[0]], "image_to_text", no_border, 1)
    col = torch.tensor([0.5, math.e**2 / (math.e**2 + 1)])
    torch.testing.assert_close(rows[0, 0], col / col.sum())


def test_text_to_image_rows_are_text_queries_softmaxed_over_the_image_keys():
    # q_txt = [ln 2 * 2] (D = 4, so / sqrt(D) halves it), k_img = [0, 1, 2]: the row ~ 2^x.
    q_txt = torch.tensor([2 * LN2, 0, 0, 0]).view(1, 1, 1, 4)
    k_img = torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0]]).view(1, 1, 3, 4)
    no_border = torch.zeros(3, dtype=torch.bool)
    rows = maps._paper_cross_maps(k_img, k_img, q_txt, None, [[0]], "text_to_image", no_border, 1)
    torch.testing.assert_close(rows[0, 0], torch.tensor([1.0, 2, 4]) / 7)


def test_paper_map_is_the_mean_self_attention_row_of_the_salient_tokens():
    # 4x4 grid, salient_ratio 1/8 -> 2 salient tokens; the text query picks image tokens 5 and 10.
    n, d = 16, 4
    gen = torch.Generator().manual_seed(3)
    q_img = torch.randn(1, 1, n, d, generator=gen)
    k_img = torch.randn(1, 1, n, d, generator=gen) * 0.1
    k_img[0, 0, 5, 0] = k_img[0, 0, 10, 0] = 20.0
    q_txt = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, d)
    out = paper_similarity_maps(q_img, k_img, [[0]], grid_hw=(4, 4), q_txt=q_txt, salient_ratio=0.125)
    self_rows = (q_img[0, 0, [5, 10]] @ k_img[0, 0].T / math.sqrt(d)).softmax(dim=-1)  # [2, N]
    torch.testing.assert_close(out.subjects[0, 0], self_rows.mean(dim=0))


# --------------------------------------------------------------------------------------------------
# Against naive references (full N x N matrices, loops), random inputs


def _reference_official(q_img, k_txt, o_img, sets, n_subjects, scale, ratio, tau, over):
    """The maps, and whether a core was ambiguous (a tie at the top-k boundary, e.g. saturated softmaxes)."""
    b_count, heads, n, _ = q_img.shape
    k = max(1, int(n * ratio))
    out = torch.zeros(b_count, len(sets), n)
    ambiguous = False
    for b in range(b_count):
        s = []
        for pos in sets:
            acc = torch.zeros(n)
            for h in range(heads):
                logits = q_img[b, h] @ k_txt[b, h].T * scale  # [N, T]
                probs = logits.softmax(dim=0 if over == "image" else 1)
                acc += probs[:, pos].mean(dim=1)
            s.append(acc / heads)
        gram = o_img[b] @ o_img[b].T  # [N, N]
        for i in range(len(sets)):
            others = sum(s[m] for m in range(n_subjects) if m != i)
            score = n_subjects * s[i] - others if i < n_subjects else s[i]  # no contrast for the background
            ranked = score.sort(descending=True).values
            ambiguous |= k < n and bool(ranked[k - 1] - ranked[k] < 1e-6)
            core = score.argsort(descending=True)[:k]
            out[b, i] = (gram[core].mean(dim=0) / tau).softmax(dim=0)
    return out, ambiguous


def _reference_paper(q_img, k_img, q_txt, k_txt, sets, grid, direction, sink_ratio, border, sal_ratio):
    b_count, heads, n, d = q_img.shape
    h_grid, w_grid = grid
    k_sink, k_sal = max(1, int(n * sink_ratio)), max(1, int(n * sal_ratio))
    edge = [
        r < border or r >= h_grid - border or c < border or c >= w_grid - border
        for r in range(h_grid)
        for c in range(w_grid)
    ]
    out = torch.zeros(b_count, len(sets), n)
    ambiguous = False
    for b in range(b_count):
        for i, pos in enumerate(sets):
            m = torch.zeros(n)
            for h in range(heads):
                if direction == "text_to_image":
                    a = (q_txt[b, h] @ k_img[b, h].T / math.sqrt(d)).softmax(dim=1)  # [T, N]
                else:
                    a = (q_img[b, h] @ k_txt[b, h].T / math.sqrt(d)).softmax(dim=1).T  # [T, N]
                    a = a / a.sum(dim=1, keepdim=True)
                for t in pos:
                    row = a[t].clone()
                    threshold = row.sort(descending=True).values[k_sink - 1]
                    for j in range(n):
                        if edge[j] and row[j] >= threshold:
                            row[j] = 0.0
                    m += row / row.sum()
            ranked = (m / (heads * len(pos))).sort(descending=True).values
            ambiguous |= k_sal < n and bool(ranked[k_sal - 1] - ranked[k_sal] < 1e-6)
            salient = (m / (heads * len(pos))).argsort(descending=True)[:k_sal]
            for h in range(heads):
                self_attn = (q_img[b, h] @ k_img[b, h].T / math.sqrt(d)).softmax(dim=1)  # [N, N]
                out[b, i] += self_attn[salient].mean(dim=0) / heads
    return out, ambiguous


@st.composite
def _layer(draw):
    h, w = draw(st.integers(3, 6)), draw(st.integers(3, 6))
    b, heads, t, c = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(4, 9)),
        draw(st.integers(1, 3)),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    q_img, k_img = (torch.randn(b, heads, h * w, 4, generator=gen) * 2 for _ in range(2))
    q_txt, k_txt = (torch.randn(b, heads, t, 4, generator=gen) * 2 for _ in range(2))
    o_img = torch.randn(b, h * w, 6, generator=gen)
    sets = [draw(st.lists(st.integers(0, t - 1), min_size=1, max_size=3)) for _ in range(c)]
    background = draw(st.none() | st.lists(st.integers(0, t - 1), min_size=1, max_size=2))
    return dict(q_img=q_img, k_img=k_img, q_txt=q_txt, k_txt=k_txt, o_img=o_img, grid=(h, w), sets=sets, bg=background)


def _stack(out: SimilarityMaps) -> torch.Tensor:
    parts = [out.subjects] + ([out.background[:, None]] if out.background is not None else [])
    return torch.cat(parts, dim=1)


@settings(max_examples=30, deadline=None)
@given(layer=_layer(), over=st.sampled_from(["image", "text"]), ratio=st.sampled_from([0.05, 0.2, 0.5]))
def test_official_maps_match_the_naive_reference(layer, over, ratio):
    sets = layer["sets"] + ([layer["bg"]] if layer["bg"] is not None else [])
    expected, ambiguous = _reference_official(
        layer["q_img"], layer["k_txt"], layer["o_img"], sets, len(layer["sets"]), 0.7, ratio, 3.0, over
    )
    assume(not ambiguous)  # tied scores at the core boundary: any choice among them is right
    out = official_similarity_maps(
        layer["q_img"],
        layer["k_txt"],
        layer["o_img"],
        layer["sets"],
        layer["bg"],
        logit_scale=0.7,
        top_k_ratio=ratio,
        temperature=3.0,
        cross_softmax=over,
    )
    torch.testing.assert_close(_stack(out), expected, atol=1e-5, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    layer=_layer(),
    direction=st.sampled_from(["text_to_image", "image_to_text"]),
    sink=st.sampled_from([(0.01, 1), (0.1, 1), (0.2, 2), (0.1, 0)]),
    salient=st.sampled_from([0.01, 0.1, 0.3]),
)
def test_paper_maps_match_the_naive_reference(layer, direction, sink, salient):
    sets = layer["sets"] + ([layer["bg"]] if layer["bg"] is not None else [])
    expected, ambiguous = _reference_paper(
        layer["q_img"],
        layer["k_img"],
        layer["q_txt"],
        layer["k_txt"],
        sets,
        layer["grid"],
        direction,
        sink[0],
        sink[1],
        salient,
    )
    assume(not ambiguous)  # tied scores at the salient-set boundary: any choice among them is right
    out = paper_similarity_maps(
        layer["q_img"],
        layer["k_img"],
        layer["sets"],
        layer["bg"],
        grid_hw=layer["grid"],
        q_txt=layer["q_txt"],
        k_txt=layer["k_txt"],
        cross_direction=direction,
        sink_top_ratio=sink[0],
        sink_border=sink[1],
        salient_ratio=salient,
    )
    torch.testing.assert_close(_stack(out), expected, atol=1e-5, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(layer=_layer(), data=st.data())
def test_permuting_the_subjects_permutes_the_maps(layer, data):
    order = data.draw(st.permutations(range(len(layer["sets"]))))
    permuted = [layer["sets"][i] for i in order]
    for run in (
        lambda sets: official_similarity_maps(
            layer["q_img"],
            layer["k_txt"],
            layer["o_img"],
            sets,
            layer["bg"],
            logit_scale=0.5,
            temperature=2.0,
        ),
        lambda sets: paper_similarity_maps(
            layer["q_img"],
            layer["k_img"],
            sets,
            layer["bg"],
            grid_hw=layer["grid"],
            q_txt=layer["q_txt"],
            salient_ratio=0.2,
        ),
    ):
        base, moved = run(layer["sets"]), run(permuted)
        torch.testing.assert_close(moved.subjects, base.subjects[:, list(order)], atol=1e-6, rtol=1e-5)
        if base.background is not None:
            torch.testing.assert_close(moved.background, base.background, atol=1e-6, rtol=1e-5)


def test_head_chunking_does_not_change_the_result(monkeypatch):
    case = planted_case((6, 8), 3, batch=2, heads=5, seed=4)
    whole = maps_by_method(case)
    monkeypatch.setattr(maps, "_CHUNK_ELEMENTS", 1)  # one head at a time
    for name, chunked in maps_by_method(case).items():
        torch.testing.assert_close(chunked.subjects, whole[name].subjects, msg=name)
        torch.testing.assert_close(chunked.background, whole[name].background, msg=name)


# --------------------------------------------------------------------------------------------------
# Shapes, distributions, dtypes


_TENSORS = ("q_img", "k_img", "o_img", "q_txt", "k_txt")


@pytest.mark.parametrize("n_subjects", [1, 2, 3, 4])
def test_maps_are_float32_distributions_of_shape_b_c_n(n_subjects):
    case = planted_case((10, 12), n_subjects, batch=2, seed=n_subjects)
    for name, out in maps_by_method(case).items():
        assert out.subjects.shape == (2, n_subjects, 120), name
        assert out.background is not None and out.background.shape == (2, 120), name
        for m in (out.subjects, out.background):
            assert m.dtype == torch.float32 and (m >= 0).all(), name
            torch.testing.assert_close(m.sum(dim=-1), torch.ones(m.shape[:-1]), msg=name)
    for name, out in maps_by_method(case, background=False).items():
        assert out.background is None, name


def test_half_precision_inputs_give_float32_maps():
    case = planted_case((8, 8), 2, seed=5)
    half = replace(case, **{name: getattr(case, name).to(torch.bfloat16) for name in _TENSORS})
    for name, out in maps_by_method(half).items():
        assert out.subjects.dtype == torch.float32 and out.background.dtype == torch.float32, name
        torch.testing.assert_close(out.subjects.sum(dim=-1), torch.ones(1, 2), msg=name)


def test_batch_rows_are_computed_independently():
    case = planted_case((8, 10), 3, batch=2, seed=6)
    together = maps_by_method(case)
    for row in range(2):
        single = replace(case, **{name: getattr(case, name)[row : row + 1] for name in _TENSORS})
        for name, alone in maps_by_method(single).items():
            torch.testing.assert_close(together[name].subjects[row : row + 1], alone.subjects, msg=name)
            torch.testing.assert_close(together[name].background[row : row + 1], alone.background, msg=name)
