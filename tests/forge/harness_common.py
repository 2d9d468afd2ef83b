"""Glue shared by the FLUX and SDXL parts of the real-Forge harness.

Seeded random weights, a Forge model built and loaded the way backend/loader.py does it, the stacked
prompt conds that `sampling_function` reads, and Forge's "Simple" sigma schedule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LoraFile:
    """A LoRA 'on disk': Forge keys its patches by `filename`; `state_dict` is what the file holds."""

    filename: str
    name: str
    state_dict: dict[str, torch.Tensor]


class PromptConds(dict):
    """Stacked prompt conds, as the webui hands them to `sampling_function`.

    Stands in for `modules.prompt_parser.DictWithShape` (that module needs `lark`): a dict of tensors
    with `.shape` (of `crossattn`) and `advanced_indexing(rows)`, which `compile_weighted_conditions` uses.
    """

    @property
    def shape(self) -> torch.Size:
        return self["crossattn"].shape

    def advanced_indexing(self, rows: list[int]) -> PromptConds:
        return PromptConds({k: v[rows] for k, v in self.items() if isinstance(v, torch.Tensor)})


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: on tensors this small, thread hand-offs cost ~10x the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def weight_std(fan_in: int) -> float:
    """Std of a random weight with `fan_in` inputs (in_features, or in_channels * kernel area)."""
    return min(0.1, max(0.02, 0.5 / math.sqrt(fan_in)))


def parameter_shapes(make_model: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Names and shapes of every parameter, in state-dict order, from a meta build with plain torch
    layers (they have the same parameters as Forge's operations)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in make_model().state_dict().items()}


def random_weights(shapes: dict[str, torch.Size], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded normal weights, drawn in `shapes` order from one generator: norm scales (RMSNorm `.scale`,
    GroupNorm/LayerNorm 1-D `.weight`) 1 + N(0, 0.1^2), biases N(0, 0.02^2), Linear/Conv weights
    N(0, weight_std(fan_in)^2) with fan_in = prod(shape[1:])."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith(".scale") or (key.endswith(".weight") and len(shape) == 1):
            value = 1.0 + 0.1 * noise
        elif key.endswith(".bias"):
            value = 0.02 * noise
        else:
            value = weight_std(math.prod(shape[1:])) * noise
        weights[key] = value.to(dtype)
    return weights


def build_like_loader(forge, make_model: Callable[[], torch.nn.Module], config: dict, seed: int, dtype: torch.dtype):
    """A diffusion model built as backend/loader.py builds a UNet/transformer component: devices from
    memory_management, layers from `using_forge_operations`, `load_state_dict`, the config and the
    dtype/device attributes that KModel and the patcher read. Weights from `random_weights`."""
    weights = random_weights(parameter_shapes(make_model), seed, dtype)
    mm = forge.memory_management
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    n_params = sum(t.numel() for t in weights.values())
    initial_device = mm.unet_inital_load_device(parameters=n_params, dtype=dtype)
    with forge.operations.using_forge_operations(device=initial_device, dtype=dtype, manual_cast_enabled=False):
        dm = make_model().to(device=initial_device, dtype=dtype)
    forge.state_dict.load_state_dict(dm, weights)

    unloaded = [n for n, m in dm.named_modules() if hasattr(m, "dummy")]
    missing = sorted(set(dm.state_dict()) ^ set(weights))
    if unloaded or missing:
        raise RuntimeError(f"Forge layers left without weights: {unloaded[:5]} {missing[:5]}")

    if hasattr(dm, "_internal_dict"):  # diffusers ConfigMixin models (the UNet), as loader.py does
        dm._internal_dict = config
    else:
        dm.config = config
    dm.storage_dtype = dtype
    dm.computation_dtype = dtype
    dm.load_device = load_device
    dm.initial_device = initial_device
    dm.offload_device = offload_device
    return dm


def random_lora_factors(
    weight_shape: torch.Size, rank: int, scale: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for one layer, down first from `gen`. Linear [out, in]: down [r, in] ~ N(0, scale^2/in),
    up [out, r] ~ N(0, scale^2/r). Conv [out, in, kh, kw] (LoCon): down [r, in, kh, kw] with
    fan_in in*kh*kw, up [out, r, 1, 1]."""
    n_out, n_in, *kernel = weight_shape
    fan_in = n_in * math.prod(kernel)
    down = torch.randn(rank, n_in, *kernel, generator=gen) * (scale / math.sqrt(fan_in))
    up = torch.randn(n_out, rank, *[1] * len(kernel), generator=gen) * (scale / math.sqrt(rank))
    return down, up


def simple_sigmas(predictor, steps: int) -> torch.Tensor:
    """Forge's "Simple" schedule (the FLUX and SDXL preset default): `steps` evenly spaced entries of the
    predictor's ascending sigma table, from the top, then 0. For PredictionFlux that is
    time_shift(mu, 1 - i/steps) when steps divides the table length (10000)."""
    table = predictor.sigmas  # [n], ascending (10000 for FLUX, 1000 for the EPS Prediction)
    n = len(table)
    picked = [float(table[n - 1 - (i * n) // steps]) for i in range(steps)]
    return torch.tensor([*picked, 0.0], dtype=torch.float32)
