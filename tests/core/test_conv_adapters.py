"""LoCon deltas of a conv layer with per-pixel LoRA weights."""

import pytest
import torch
import torch.nn.functional as F

from freefuse.conv_adapters import ConvLowRankFactor, MaskedConvDelta

F64 = torch.float64


def locon(in_c, out_c, rank, owner, scale=0.7, k=3):
    return ConvLowRankFactor(
        down=torch.randn(rank, in_c, k, k, dtype=F64),
        up=torch.randn(out_c, rank, 1, 1, dtype=F64),
        scale=scale,
        owner=owner,
    )


@pytest.mark.parametrize("stride", [1, 2])
def test_all_ones_equals_the_merged_conv_weight(stride):
    factors = [locon(4, 6, 2, 0), locon(4, 6, 3, 1, scale=0.2)]
    layer = MaskedConvDelta(factors, stride=stride, padding=1, dtype=F64)
    weight = torch.randn(6, 4, 3, 3, dtype=F64)
    merged = weight + sum(f.scale * (f.up.flatten(1) @ f.down.flatten(1)).reshape(6, 4, 3, 3) for f in factors)
    x = torch.randn(2, 4, 9, 7, dtype=F64)
    base = F.conv2d(x, weight, stride=stride, padding=1)
    torch.testing.assert_close(base + layer(x), F.conv2d(x, merged, stride=stride, padding=1), rtol=0, atol=1e-10)


def test_per_pixel_weights_keep_each_lora_to_its_pixels():
    factors = [locon(3, 5, 2, 0), locon(3, 5, 2, 1)]
    layer = MaskedConvDelta(factors, padding=1, dtype=F64)
    x = torch.randn(1, 3, 4, 6, dtype=F64)
    weights = torch.zeros(1, 2, 4, 6, dtype=F64)
    weights[:, 0, :, :3] = 1  # LoRA 0 on the left half, LoRA 1 on the right half
    weights[:, 1, :, 3:] = 1
    only = [MaskedConvDelta([f], padding=1, dtype=F64)(x) for f in factors]
    out = layer(x, weights)
    torch.testing.assert_close(out[..., :3], only[0][..., :3], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[..., 3:], only[1][..., 3:], rtol=0, atol=1e-12)
    torch.testing.assert_close(out, layer.reference(x, weights), rtol=0, atol=1e-12)
    assert torch.equal(layer(x, torch.zeros_like(weights)), torch.zeros_like(out))


def test_weights_are_repeated_over_cfg_chunks_and_checked():
    layer = MaskedConvDelta([locon(3, 5, 2, 0)], padding=1, dtype=F64)
    x = torch.randn(4, 3, 4, 4, dtype=F64)
    weights = torch.rand(2, 1, 4, 4, dtype=F64)
    out = layer(x, weights)
    torch.testing.assert_close(out[2:], layer(x[2:], weights), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="pixels"):
        layer(x, torch.ones(1, 1, 3, 3, dtype=F64))


def test_factors_must_fit_one_layer():
    with pytest.raises(ValueError, match="kernel size"):
        MaskedConvDelta([locon(3, 5, 2, 0, k=3), locon(3, 5, 2, 1, k=1)])
