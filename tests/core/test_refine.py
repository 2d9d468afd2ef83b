"""Latent-level refinement (freefuse.refine) on tiny random CLIP / DINOv2 encoders and a tiny decoder: the
gradient reaches the latent and never a weight, no autograd state survives, it works under inference mode, and
the step has the size it promises."""

from __future__ import annotations

import pytest
import torch

from freefuse import refine
from tests.tiny.encoders import TinyDecoder, tiny_clip, tiny_dino


@pytest.fixture(scope="module")
def clip():
    return refine.clip_encoder(tiny_clip(), "tiny-clip")


@pytest.fixture(scope="module")
def dino():
    return refine.dino_encoder(tiny_dino(), "tiny-dino")


def _images(n, seed, size=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size + 8, generator=g) for _ in range(n)]


def _targets(clip, dino, boxes):
    style = refine.anchor(clip, _images(1, 10))
    subject = refine.anchor(dino, _images(2, 11))
    return refine.Targets(clip, style, [refine.SubjectTarget(dino, subject, boxes)])


def _weights(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def test_preprocess_keeps_the_gradient_that_8_bit_rounding_would_stop(clip):
    images = torch.rand(2, 3, 20, 30, requires_grad=True)
    pixels = refine.preprocess(images, clip)
    assert pixels.shape == (2, 3, 32, 32)
    (grad,) = torch.autograd.grad(pixels.sum(), images)
    assert grad.abs().sum() > 0


def test_anchor_is_the_unit_mean_direction(clip):
    image = _images(1, 3)[0]
    one = refine.anchor(clip, [image])
    assert torch.allclose(one.norm(), torch.tensor(1.0))
    assert torch.allclose(refine.anchor(clip, [image, image]), one, atol=1e-6)
    assert torch.allclose(one, refine.embed(clip, image[None])[0], atol=1e-6)


def test_box_of_a_mask_in_fractions_with_padding():
    mask = torch.zeros(10, 20)
    mask[2:6, 5:15] = 1
    assert refine.box_of(mask, pad=0.0) == (0.2, 0.6, 0.25, 0.75)
    top, bottom, left, right = refine.box_of(mask, pad=0.25)
    assert (top, bottom) == pytest.approx((0.1, 0.7)) and (left, right) == pytest.approx((0.125, 0.875))
    assert refine.box_of(torch.zeros(4, 4)) is None
    images = torch.zeros(1, 3, 100, 200)
    assert refine.crop(images, (0.2, 0.6, 0.25, 0.75)).shape == (1, 3, 40, 100)
    assert refine.crop(images, (0.5, 0.5, 0.5, 0.5)).shape == (1, 3, 1, 1)  # never empty


@pytest.mark.parametrize("halved", [(8, 8, 0), (64, 64, 0), (128, 128, 1), (128, 96, 1), (256, 200, 2)])
def test_latents_are_halved_down_to_512_pixel_images(halved):
    h, w, n = halved
    assert refine.halvings(h, w) == n


def test_the_gradient_moves_the_latent_and_never_a_weight(clip, dino):
    decoder = TinyDecoder()
    before = _weights(decoder)
    x0 = torch.randn(2, 4, 16, 16)
    targets = _targets(clip, dino, [(0.0, 0.5, 0.0, 0.5), (0.25, 1.0, 0.25, 1.0)])
    refined, value = refine.refine_x0(x0, decoder, targets, strength=0.05)
    assert not torch.equal(refined, x0)
    assert value.item() > 0 and not value.requires_grad
    assert not refined.requires_grad and refined.grad_fn is None
    assert all(p.grad is None for p in decoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(decoder), strict=True))


def test_encoders_keep_no_gradient_and_no_graph(clip, dino):
    decoder = TinyDecoder()
    x0 = torch.randn(1, 4, 16, 16)
    refine.refine_x0(x0, decoder, _targets(clip, dino, [(0.0, 1.0, 0.0, 1.0)]), strength=0.05)
    clip_model = clip.run.__closure__[0].cell_contents
    assert all(p.grad is None for p in clip_model.parameters())
    assert all(p.grad is None for p in decoder.parameters())


def test_each_image_moves_by_strength_times_its_own_rms(clip, dino):
    decoder = TinyDecoder()
    x0 = torch.randn(2, 4, 16, 16)
    x0[1] *= 3.0
    refined, _ = refine.refine_x0(x0, decoder, _targets(clip, dino, [(0, 1, 0, 1)] * 2), strength=0.02)
    for i in range(2):
        moved = (refined[i] - x0[i]).pow(2).mean().sqrt()
        assert moved == pytest.approx(0.02 * x0[i].pow(2).mean().sqrt().item(), rel=1e-3)


def test_a_small_step_lowers_the_loss(clip, dino):
    decoder = TinyDecoder()
    x0 = torch.randn(1, 4, 16, 16)
    targets = _targets(clip, dino, [(0.1, 0.9, 0.1, 0.9)])
    refined, before = refine.refine_x0(x0, decoder, targets, strength=0.005)
    _, after = refine.refine_x0(refined, decoder, targets, strength=0.005)
    assert after < before


def test_an_image_without_the_subject_and_no_style_is_left_as_it_is(dino):
    decoder = TinyDecoder()
    x0 = torch.randn(2, 4, 16, 16)
    subject = refine.SubjectTarget(dino, refine.anchor(dino, _images(1, 5)), [(0, 1, 0, 1), None])
    refined, _ = refine.refine_x0(x0, decoder, refine.Targets(subjects=[subject]), strength=0.05)
    assert not torch.equal(refined[0], x0[0])
    assert torch.equal(refined[1], x0[1])


def test_no_targets_or_no_strength_returns_x0_itself(clip, dino):
    x0 = torch.randn(1, 4, 8, 8)
    assert refine.refine_x0(x0, TinyDecoder(), refine.Targets(), 0.1)[0] is x0
    assert refine.refine_x0(x0, TinyDecoder(), _targets(clip, dino, [None]), 0.0)[0] is x0


def test_works_inside_inference_mode_on_inference_tensors(clip, dino):
    with torch.inference_mode():
        decoder = refine.grad_ready(TinyDecoder())  # weights made in inference mode, as Forge loads them
        x0 = torch.randn(1, 4, 16, 16)
        assert x0.is_inference()
        refined, _ = refine.refine_x0(x0, decoder, _targets(clip, dino, [(0, 1, 0, 1)]), strength=0.05)
    assert not torch.equal(refined, x0)
    assert refined.dtype == x0.dtype and refined.shape == x0.shape


def test_a_module_loaded_in_inference_mode_gets_a_private_copy_that_backpropagates():
    with torch.inference_mode():
        loaded = TinyDecoder()
    plain = TinyDecoder()
    assert refine.grad_ready(plain) is plain  # nothing to copy
    twin = refine.grad_ready(loaded)
    assert twin is not loaded and not any(p.is_inference() for p in twin.parameters())
    z = torch.randn(1, 4, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(twin(z).sum(), z)
    assert grad.abs().sum() > 0
    assert torch.equal(twin.conv.weight, loaded.conv.weight.clone())
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loaded(z).sum(), z)  # what the copy is for


def test_half_precision_latents_come_back_in_half_precision(clip, dino):
    x0 = torch.randn(1, 4, 16, 16).half()
    refined, _ = refine.refine_x0(x0, lambda z: TinyDecoder()(z.float()), _targets(clip, dino, [(0, 1, 0, 1)]), 0.05)
    assert refined.dtype == torch.float16


@pytest.mark.parametrize(
    "step,steps,inside", [(0, 20, False), (5, 20, True), (15, 20, True), (16, 20, False), (3, 0, False)]
)
def test_the_window_is_a_fraction_of_the_schedule(step, steps, inside):
    assert refine.in_window(step, steps, 0.25, 0.75) is inside


def test_a_plain_copy_is_independent_of_the_original():
    original = TinyDecoder()
    twin = refine.plain_copy(original)
    twin.to(torch.float64)
    with torch.no_grad():
        twin.conv.weight.zero_()
    assert original.conv.weight.dtype == torch.float32 and original.conv.weight.abs().sum() > 0
    assert not any(p.requires_grad for p in twin.parameters())


def test_one_box_serves_every_image_of_the_batch(dino):
    subject = refine.SubjectTarget(dino, refine.anchor(dino, _images(1, 5)), [(0, 1, 0, 1)])
    x0 = torch.randn(2, 4, 16, 16)
    refined, _ = refine.refine_x0(x0, TinyDecoder(), refine.Targets(subjects=[subject]), strength=0.05)
    assert not torch.equal(refined[0], x0[0]) and not torch.equal(refined[1], x0[1])


def test_a_plain_copy_is_made_on_the_asked_dtype_without_touching_the_original():
    with torch.inference_mode():
        original = TinyDecoder()
        twin = refine.plain_copy(original, "cpu", torch.float64)
    assert twin.conv.weight.dtype == torch.float64 and not twin.conv.weight.is_inference()
    assert original.conv.weight.dtype == torch.float32
    torch.testing.assert_close(twin.conv.weight.float(), original.conv.weight.clone())
