"""Masked LoRA deltas: exactness against merged weights, per-token weighting, fused == per-LoRA loop."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from freefuse.adapters import (
    DenseDelta,
    LowRankFactor,
    MaskedDelta,
)
from freefuse.call_weights import MASKED, CallShape, exclusion_pattern, image_weights, text_weights

F64 = torch.float64


def lora(in_f: int, size: int, rank: int, owner: int, out_slice=None, strength=0.8, alpha=None):
    """A random LoRA factor with Forge's scale = strength * alpha / r."""
    alpha = float(rank) / 2 if alpha is None else alpha
    return LowRankFactor(
        down=torch.randn(rank, in_f, dtype=F64),
        up=torch.randn(size, rank, dtype=F64),
        scale=strength * alpha / rank,
        owner=owner,
        out_slice=out_slice,
    )


def merged_delta(out_features: int, factors, dense=()) -> torch.Tensor:
    """What Forge's merge writes into the weight: scale * up @ down into each factor's slice."""
    in_f = (factors[0].down if factors else dense[0].weight).shape[1]
    delta_w = torch.zeros(out_features, in_f, dtype=F64)
    for f in factors:
        start, size = f.out_slice or (0, out_features)
        delta_w[start : start + size] += f.scale * f.up @ f.down
    for d in dense:
        start, size = d.out_slice or (0, out_features)
        delta_w[start : start + size] += d.weight
    return delta_w


def qkv_loras(h: int, in_f: int, ranks: list[int]) -> list[LowRankFactor]:
    """Diffusers-style LoRAs: one to_q/to_k/to_v factor each, written at offsets 0, h, 2h of a fused qkv."""
    return [lora(in_f, h, rank, owner, out_slice=(j * h, h)) for owner, rank in enumerate(ranks) for j in range(3)]


# ------------------------------------------------------------------ exactness with all weights 1


def test_unsliced_lora_matches_merged_weight():
    factors = [lora(6, 5, 2, owner=0), lora(6, 5, 3, owner=1)]
    w = torch.randn(5, 6, dtype=F64)
    x = torch.randn(2, 4, 6, dtype=F64)  # [B, L, in]
    adapter = MaskedDelta(5, factors)

    merged = F.linear(x, w + merged_delta(5, factors))
    assert torch.allclose(F.linear(x, w) + adapter(x), merged, rtol=0, atol=1e-12)


def test_fused_qkv_slices_with_mixed_ranks_match_merged_weight():
    h, in_f = 4, 5
    factors = qkv_loras(h, in_f, ranks=[2, 3])
    w = torch.randn(3 * h, in_f, dtype=F64)
    x = torch.randn(1, 7, in_f, dtype=F64)
    adapter = MaskedDelta(3 * h, factors)
    ones = torch.ones(1, 7, 2, dtype=F64)

    merged = F.linear(x, w + merged_delta(3 * h, factors))
    assert torch.allclose(F.linear(x, w) + adapter(x), merged, rtol=0, atol=1e-12)
    assert torch.allclose(F.linear(x, w) + adapter(x, ones), merged, rtol=0, atol=1e-12)


def test_linear1_slices_including_proj_mlp_match_merged_weight():
    # FLUX single block linear1: q, k, v at 0, h, 2h (size h), proj_mlp at 3h (size 4h); out = 7h.
    h, in_f = 3, 4
    slices = [(0, h), (h, h), (2 * h, h), (3 * h, 4 * h)]
    factors = [lora(in_f, size, rank=1 + j % 2, owner=0, out_slice=(a, size)) for j, (a, size) in enumerate(slices)]
    factors.append(lora(in_f, 4 * h, rank=3, owner=1, out_slice=(3 * h, 4 * h)))  # a second LoRA, mlp only
    w = torch.randn(7 * h, in_f, dtype=F64)
    x = torch.randn(2, 5, in_f, dtype=F64)
    adapter = MaskedDelta(7 * h, factors)

    merged = F.linear(x, w + merged_delta(7 * h, factors))
    assert torch.allclose(F.linear(x, w) + adapter(x), merged, rtol=0, atol=1e-12)


def test_dense_delta_in_a_slice_matches_merged_weight():
    factors = [lora(4, 6, 2, owner=0)]
    dense = [DenseDelta(torch.randn(3, 4, dtype=F64), owner=1, out_slice=(3, 3))]
    w = torch.randn(6, 4, dtype=F64)
    x = torch.randn(1, 3, 4, dtype=F64)

    merged = F.linear(x, w + merged_delta(6, factors, dense))
    out = F.linear(x, w) + MaskedDelta(6, factors, dense)(x)
    assert torch.allclose(out, merged, rtol=0, atol=1e-12)


def test_add_to_adds_in_place_into_a_layer_output():
    factors = qkv_loras(3, 4, ranks=[2])
    w = torch.randn(9, 4, dtype=F64)
    x = torch.randn(1, 5, 4, dtype=F64)
    base = F.linear(x, w)
    returned = MaskedDelta(9, factors).add_to(base, x)

    assert returned is base
    assert torch.allclose(base, F.linear(x, w + merged_delta(9, factors)), atol=1e-12)


# ------------------------------------------------------------------ token weights


def test_all_zero_weights_give_exactly_zero_delta():
    factors = qkv_loras(3, 4, ranks=[2, 4])
    dense = [DenseDelta(torch.randn(9, 4, dtype=F64), owner=1)]
    x = torch.randn(2, 5, 4, dtype=F64)
    delta = MaskedDelta(9, factors, dense)(x, torch.zeros(2, 5, 2, dtype=F64))
    assert torch.equal(delta, torch.zeros_like(delta))


def test_zero_weight_of_one_lora_leaves_exactly_the_other_loras_at_that_token():
    h, in_f = 3, 4
    first, second = qkv_loras(h, in_f, ranks=[2]), qkv_loras(h, in_f, ranks=[3])
    second = [LowRankFactor(f.down, f.up, f.scale, owner=1, out_slice=f.out_slice) for f in second]
    x = torch.randn(1, 4, in_f, dtype=F64)
    weights = torch.ones(1, 4, 2, dtype=F64)
    weights[0, 1, 0] = 0.0  # token 1: LoRA 0 off
    weights[0, 2, 1] = 0.0  # token 2: LoRA 1 off

    delta = MaskedDelta(3 * h, first + second)(x, weights)
    only_first = MaskedDelta(3 * h, first)(x)
    only_second = MaskedDelta(3 * h, second)(x)

    assert torch.allclose(delta[0, 1], only_second[0, 1], rtol=0, atol=1e-12)
    assert torch.allclose(delta[0, 2], only_first[0, 2], rtol=0, atol=1e-12)
    assert torch.allclose(delta[0, 0], only_first[0, 0] + only_second[0, 0], rtol=0, atol=1e-12)


def test_fractional_weight_scales_that_loras_delta_per_token():
    factor = lora(4, 5, 2, owner=0)
    x = torch.randn(1, 3, 4, dtype=F64)
    weights = torch.tensor([[[0.25], [1.0], [0.5]]], dtype=F64)  # [1, 3, 1]
    full = MaskedDelta(5, [factor])(x)
    assert torch.allclose(MaskedDelta(5, [factor])(x, weights), full * weights, atol=1e-12)


def test_dense_terms_follow_their_owners_weight():
    factor = lora(4, 5, 2, owner=0)
    dense = DenseDelta(torch.randn(5, 4, dtype=F64), owner=1)
    x = torch.randn(1, 2, 4, dtype=F64)
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)  # token 0: LoRA 0 only; token 1: dense only
    delta = MaskedDelta(5, [factor], [dense])(x, weights)
    assert torch.allclose(delta[0, 0], MaskedDelta(5, [factor])(x)[0, 0], rtol=0, atol=1e-12)
    assert torch.allclose(delta[0, 1], F.linear(x[0, 1], dense.weight), rtol=0, atol=1e-12)


def test_weights_batch_is_repeated_per_cfg_chunk():
    factors = [lora(4, 5, 2, owner=0)]
    adapter = MaskedDelta(5, factors)
    x = torch.randn(4, 3, 4, dtype=F64)  # 2 chunks (cond, uncond) of 2 images
    per_image = torch.rand(2, 3, 1, dtype=F64)
    expected = adapter(x, per_image.repeat(2, 1, 1))
    assert torch.allclose(adapter(x, per_image), expected, atol=1e-12)
    assert torch.allclose(adapter(x, per_image[:1]), adapter(x, per_image[:1].expand(4, -1, -1)), atol=1e-12)


def test_global_2d_input_works_with_and_without_weights():
    factors = [lora(6, 4, 3, owner=0), lora(6, 4, 2, owner=1)]
    w = torch.randn(4, 6, dtype=F64)
    x = torch.randn(3, 6, dtype=F64)  # [B, in], e.g. a modulation vector
    adapter = MaskedDelta(4, factors)

    assert torch.allclose(F.linear(x, w) + adapter(x), F.linear(x, w + merged_delta(4, factors)), atol=1e-12)
    weights = torch.tensor([[1.0, 0.0]], dtype=F64).expand(3, 2)  # [B, A]
    assert torch.allclose(adapter(x, weights), MaskedDelta(4, factors[:1])(x), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n_lora=st.integers(1, 4),
    ranks=st.lists(st.integers(1, 5), min_size=4, max_size=4),
    layout=st.sampled_from(["plain", "qkv", "linear1"]),
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    with_dense=st.booleans(),
    kohya_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_per_lora_loop(n_lora, ranks, layout, batch, length, with_dense, kohya_first, seed):
    gen = torch.Generator().manual_seed(seed)
    h, in_f = 3, 5
    slices = {
        "plain": [None],
        "qkv": [(0, h), (h, h), (2 * h, h)],
        "linear1": [(0, h), (h, h), (2 * h, h), (3 * h, 4 * h)],
    }[layout]
    out_f = {"plain": 4, "qkv": 3 * h, "linear1": 7 * h}[layout]
    factors = []
    for owner in range(n_lora):
        # kohya-format LoRAs target the whole fused output; diffusers-format ones one slice per factor
        for j, sl in enumerate([None] if owner == 0 and kohya_first else slices):
            size = out_f if sl is None else sl[1]
            r = ranks[(owner + j) % 4]
            down = torch.randn(r, in_f, generator=gen, dtype=F64)
            up = torch.randn(size, r, generator=gen, dtype=F64)
            factors.append(LowRankFactor(down, up, scale=0.5 + owner, owner=owner, out_slice=sl))
    dense = [DenseDelta(torch.randn(out_f, in_f, generator=gen, dtype=F64), owner=n_lora - 1)] if with_dense else []
    x = torch.randn(batch, length, in_f, generator=gen, dtype=F64)
    weights = torch.rand(batch, length, n_lora, generator=gen, dtype=F64)
    adapter = MaskedDelta(out_f, factors, dense)

    assert adapter.n_owners == n_lora
    assert torch.allclose(adapter.up @ adapter.down, merged_delta(out_f, factors), rtol=1e-10, atol=1e-10)
    assert torch.allclose(adapter(x, weights), adapter.reference(x, weights), rtol=1e-10, atol=1e-10)
    assert torch.allclose(adapter(x), adapter.reference(x), rtol=1e-10, atol=1e-10)
    merged = F.linear(x, merged_delta(out_f, factors, dense))
    assert torch.allclose(adapter(x), merged, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ dtype, device, validation


def test_bf16_path_runs_and_is_close_to_float64():
    torch.manual_seed(1)
    factors = qkv_loras(8, 16, ranks=[4, 8])
    x = torch.randn(1, 10, 16, dtype=F64)
    weights = (torch.rand(1, 10, 2) > 0.5).float()
    exact = MaskedDelta(24, factors)(x, weights)

    bf16 = MaskedDelta(24, factors, dtype=torch.bfloat16)
    got = bf16(x.to(torch.bfloat16), weights)
    assert got.dtype == torch.bfloat16 and bf16.up.dtype == torch.bfloat16
    assert torch.allclose(got.double(), exact, rtol=0.05, atol=0.05 * exact.abs().max().item())
    moved = MaskedDelta(24, factors).to(dtype=torch.bfloat16)
    assert moved.down.dtype == torch.bfloat16
    assert torch.allclose(moved(x.to(torch.bfloat16), weights).double(), exact, atol=0.05 * exact.abs().max().item())


def test_to_keeps_results_and_reference():
    factors = [lora(4, 5, 2, owner=0)]
    adapter = MaskedDelta(5, factors)
    as_f32 = adapter.to(dtype=torch.float32)
    x = torch.randn(1, 3, 4, dtype=torch.float32)
    assert as_f32(x).dtype == torch.float32
    assert torch.allclose(as_f32(x), as_f32.reference(x), atol=1e-5)
    assert adapter.down.dtype == F64  # the original is unchanged


def test_empty_layer_returns_zeros():
    adapter = MaskedDelta(5, [])
    x = torch.randn(2, 3, 4)
    assert adapter.n_owners == 0 and adapter.rank == 0
    assert torch.equal(adapter(x), torch.zeros(2, 3, 5))


@pytest.mark.parametrize(
    "factors, message",
    [
        ([lora(4, 5, 2, owner=0, out_slice=(3, 5))], "does not fit"),
        ([lora(4, 3, 2, owner=0, out_slice=(0, 4))], "output rows"),
        ([lora(4, 5, 2, owner=0), lora(3, 5, 2, owner=1)], "same in_features"),
        ([LowRankFactor(torch.randn(2, 4), torch.randn(5, 3), 1.0, 0)], "does not match"),
        ([lora(4, 5, 2, owner=-1)], "owners"),
    ],
)
def test_bad_factors_are_rejected(factors, message):
    with pytest.raises(ValueError, match=message):
        MaskedDelta(5, factors)


def test_bad_token_weights_are_rejected():
    adapter = MaskedDelta(5, [lora(4, 5, 2, owner=0), lora(4, 5, 2, owner=1)])
    x = torch.randn(2, 3, 4, dtype=F64)
    with pytest.raises(ValueError, match="columns"):
        adapter(x, torch.ones(2, 3, 1))
    with pytest.raises(ValueError, match="tokens"):
        adapter(x, torch.ones(2, 4, 2))
    with pytest.raises(ValueError, match="divide"):
        adapter(torch.randn(3, 3, 4, dtype=F64), torch.ones(2, 3, 2))


# ------------------------------------------------------------------ with the per-call token weights


def test_joint_weights_drive_a_single_block_layer():
    # Joint layout end to end: subject 0 owns image token 0 and text token 0; subject 1 the others.
    n_txt, in_f = 2, 4
    factors = [lora(in_f, 5, 2, owner=0), lora(in_f, 5, 2, owner=1)]
    adapter = MaskedDelta(5, factors)
    masks = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, 2, 1, 2]
    shape = CallShape(cond_or_uncond=(0,), images=1, n_img=2, n_txt=n_txt)
    pattern = exclusion_pattern([[0], [1]], n_txt)
    weights = torch.cat(
        [text_weights(shape, pattern, 2, MASKED), image_weights(shape, masks, 2, MASKED)], dim=1
    ).double()
    x = torch.randn(1, n_txt + 2, in_f, dtype=F64)
    delta = adapter(x, weights)
    only = [MaskedDelta(5, [f])(x) for f in factors]
    assert torch.allclose(delta[0, 0], only[0][0, 0], atol=1e-12)  # own trigger token: own LoRA only
    assert torch.allclose(delta[0, 1], only[1][0, 1], atol=1e-12)
    assert torch.allclose(delta[0, 2], only[0][0, 2], atol=1e-12)  # image token 0: subject 0
    assert torch.allclose(delta[0, 3], only[1][0, 3], atol=1e-12)  # image token 1: subject 1
