"""The bias as extra query/key channels equals the dense additive bias, for every preset and call layout."""

import pytest
import torch

from freefuse.attention import attention_bias_channels as _channels
from freefuse.attention import attention_bias_dense, channel_extras, padded_head_dim
from freefuse.bias import BiasFactors, call_bias_factors

# two subjects on a 3x4 image grid, a 7-token prompt: A owns text 1-2, B text 4
MASKS = torch.tensor(
    [
        [[1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0]],
        [[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]],
    ],
    dtype=torch.float32,
)  # [B=2, C=2, N=12]
POSITIONS = [[1, 2], [4]]
N_TXT, N_IMG = 7, 12


def attention_bias_channels(q, k, v, factors, scale=None):
    return _channels(q, k, v, channel_extras(factors, q.shape[-1], q.dtype, q.device, scale))


def _call(layout, cond_or_uncond, **flags):
    options = dict(neg_scale=4.0, pos_scale=2.0, positive=True, bidirectional=True) | flags
    if layout == "cross":
        options.pop("bidirectional")
    return call_bias_factors(layout, MASKS, POSITIONS, N_TXT, N_TXT, cond_or_uncond, **options)


def _qkv(rows, heads, lq, lk, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, heads, n, dim, generator=gen).to(dtype) for n in (lq, lk, lk)]


@pytest.mark.parametrize("cond_or_uncond", [(0,), (1, 0)])
@pytest.mark.parametrize(
    "flags",
    [{}, {"positive": False}, {"bidirectional": False}, {"positive": False, "bidirectional": False}],
    ids=["all", "negative-only", "one-way", "negative-one-way"],
)
def test_the_joint_bias_in_channels_equals_the_dense_bias(cond_or_uncond, flags):
    factors = _call("joint", cond_or_uncond, **flags)
    rows = 2 * len(cond_or_uncond)
    q, k, v = _qkv(rows, 3, N_TXT + N_IMG, N_TXT + N_IMG, 16, torch.float32)
    dense = attention_bias_dense(q, k, v, factors.dense())
    channels = attention_bias_channels(q, k, v, factors)
    torch.testing.assert_close(channels, dense, rtol=1e-5, atol=1e-6)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(channels[-2:], plain[-2:], atol=1e-3)  # the cond rows are biased ...
    if cond_or_uncond == (1, 0):
        torch.testing.assert_close(channels[:2], plain[:2], rtol=1e-5, atol=1e-6)  # ... the uncond rows not


@pytest.mark.parametrize("cond_or_uncond", [(0,), (1, 0)])
def test_the_cross_bias_in_channels_equals_the_dense_bias(cond_or_uncond):
    factors = _call("cross", cond_or_uncond)
    q, k, v = _qkv(2 * len(cond_or_uncond), 2, N_IMG, N_TXT, 8, torch.float32, seed=1)
    torch.testing.assert_close(
        attention_bias_channels(q, k, v, factors), attention_bias_dense(q, k, v, factors.dense()), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float64, 1e-10)])
def test_channels_match_dense_to_the_precision_of_the_dtype(dtype, tol):
    factors = _call("joint", (1, 0))
    q, k, v = _qkv(4, 2, N_TXT + N_IMG, N_TXT + N_IMG, 128, torch.float32, seed=2)
    reference = attention_bias_dense(q.double(), k.double(), v.double(), factors.dense().double())
    out = attention_bias_channels(q.to(dtype), k.to(dtype), v.to(dtype), factors)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference, rtol=tol, atol=tol)


def test_an_explicit_scale_is_kept():
    factors = _call("joint", (0,))
    q, k, v = _qkv(2, 2, N_TXT + N_IMG, N_TXT + N_IMG, 16, torch.float32, seed=3)
    for scale in (0.05, 1.0):
        torch.testing.assert_close(
            attention_bias_channels(q, k, v, factors, scale=scale),
            attention_bias_dense(q, k, v, factors.dense(), scale=scale),
            rtol=1e-5,
            atol=1e-6,
        )


def test_the_head_dimension_grows_by_the_rank_rounded_to_eight():
    assert padded_head_dim(128, 4) == 136 and padded_head_dim(64, 2) == 72 and padded_head_dim(60, 4) == 64
    assert _call("joint", (0,)).rank == 4 and _call("joint", (0,), bidirectional=False).rank == 2
    assert _call("cross", (0,)).rank == 2


def test_factors_never_hold_a_query_by_key_tensor():
    factors = _call("joint", (1, 0))
    assert isinstance(factors, BiasFactors)
    assert factors.query.shape == (4, N_TXT + N_IMG, 4) and factors.key.shape == (4, N_TXT + N_IMG, 4)
