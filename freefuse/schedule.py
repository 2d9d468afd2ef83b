"""Step bookkeeping that holds for first- and second-order samplers alike.

A model call is placed in the sampling schedule by its sigma, not by counting calls: a second-order sampler
evaluates the model at intermediate sigmas between ``sigmas[i]`` and ``sigmas[i + 1]``, and all of those
belong to step ``i``.
"""

from __future__ import annotations

import torch


def step_index(sigmas: torch.Tensor, sigma: float) -> int:
    """0-based step of a model call at ``sigma`` in the descending schedule ``sigmas`` ([steps + 1])."""
    schedule = sigmas.detach().float().cpu()
    tolerance = 1e-4 * max(float(schedule.abs().max()), 1e-8)
    at_or_above = (schedule >= sigma - tolerance).nonzero()
    if at_or_above.numel() == 0:
        return 0
    return min(int(at_or_above.max()), schedule.numel() - 2)


def is_step_start(sigmas: torch.Tensor, sigma: float) -> bool:
    """True when ``sigma`` is the first sigma of its step (the call a capture should use)."""
    index = step_index(sigmas, sigma)
    reference = float(sigmas[index])
    return abs(reference - sigma) <= 1e-4 * max(abs(reference), 1e-8)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE, x at ``sigma`` -> x at ``sigma_next``."""
    derivative = (x - denoised) / sigma
    return x + derivative * (sigma_next - sigma)
