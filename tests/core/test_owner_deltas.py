"""Each owner's own delta from the shared rank activations (what style selection compares), for Linear layers
(sliced factors and dense terms) and LoCon convs: the same numbers as the fused path with one-hot weights."""

import torch
import torch.nn.functional as F

from freefuse.adapters import DenseDelta, LowRankFactor, MaskedDelta
from freefuse.conv_adapters import ConvLowRankFactor, MaskedConvDelta

GEN = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def _linear_delta():
    factors = [
        LowRankFactor(down=_rand(2, 6), up=_rand(4, 2), scale=0.5, owner=0, out_slice=(0, 4)),  # "q" of a qkv
        LowRankFactor(down=_rand(3, 6), up=_rand(8, 3), scale=1.5, owner=1),
        LowRankFactor(down=_rand(2, 6), up=_rand(4, 2), scale=2.0, owner=2, out_slice=(4, 4)),
    ]
    dense = [DenseDelta(weight=_rand(8, 6), owner=2)]
    return MaskedDelta(8, factors, dense, dtype=torch.float64)


def test_linear_owner_delta_equals_the_fused_path_with_one_hot_weights():
    delta, x = _linear_delta(), _rand(2, 5, 6)
    ranks = delta.ranks(x)
    per_owner = torch.stack([delta.owner_delta(x, ranks, o) for o in range(3)], dim=-2)  # [2, 5, 3, 8]
    for owner in range(3):
        one_hot = torch.zeros(2, 5, 3, dtype=torch.float64)
        one_hot[..., owner] = 1
        torch.testing.assert_close(per_owner[..., owner, :], delta(x, one_hot))
        torch.testing.assert_close(
            F.linear(x, delta.owner_weight(owner).double()), delta(x, one_hot), rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(per_owner.sum(-2), delta(x))


def test_add_to_with_given_ranks_is_add_to():
    delta, x = _linear_delta(), _rand(2, 5, 6)
    weights = torch.rand(2, 5, 3, generator=GEN, dtype=torch.float64)
    out = torch.zeros(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(delta.add_to(out, x, weights, ranks=delta.ranks(x)), delta(x, weights))


def test_conv_owner_delta_equals_the_fused_path_with_one_hot_weights():
    factors = [ConvLowRankFactor(down=_rand(2, 3, 3, 3), up=_rand(4, 2, 1, 1), scale=0.5, owner=o) for o in range(2)]
    delta = MaskedConvDelta(factors, padding=1, dtype=torch.float64)
    x = _rand(1, 3, 5, 5)
    ranks = delta.ranks(x)  # [1, R, 5, 5]
    by_pixel = ranks.flatten(2).transpose(1, 2)  # [1, 25, R]
    per_owner = torch.stack([delta.owner_delta(x, by_pixel, o) for o in range(2)], dim=-2)  # [1, 25, 2, 4]
    for owner in range(2):
        one_hot = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
        one_hot[:, owner] = 1
        expected = delta(x, one_hot).flatten(2).transpose(1, 2)  # [1, 25, 4]
        torch.testing.assert_close(per_owner[..., owner, :], expected)
        unfolded = F.unfold(x, 3, padding=1).transpose(1, 2)  # [1, 25, 27]: each pixel's input patch
        torch.testing.assert_close(
            F.linear(unfolded, delta.owner_weight(owner).double()), expected, rtol=1e-5, atol=1e-5
        )
