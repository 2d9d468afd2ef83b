"""Placing model calls in the schedule by sigma."""

import torch

from freefuse.schedule import euler_step, is_step_start, step_index

SIGMAS = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])


def test_first_order_calls_map_to_their_step():
    assert [step_index(SIGMAS, float(s)) for s in SIGMAS[:-1]] == [0, 1, 2, 3]


def test_second_order_intermediate_sigmas_belong_to_the_step_they_started():
    assert step_index(SIGMAS, 0.65) == 1
    assert not is_step_start(SIGMAS, 0.65)
    assert is_step_start(SIGMAS, 0.5)


def test_the_final_zero_sigma_is_never_a_step_of_its_own():
    assert step_index(SIGMAS, 0.0) == 3


def test_sigma_above_the_schedule_is_step_zero():
    assert step_index(SIGMAS, 1.5) == 0


def test_euler_step_reaches_the_denoised_latent_at_sigma_zero():
    x, denoised = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(euler_step(x, denoised, 0.7, 0.0), denoised)
    assert torch.allclose(euler_step(x, denoised, 0.7, 0.7), x)
