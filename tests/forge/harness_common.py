"""Glue shared by the FLUX and SDXL parts of the real-Forge harness: a Forge model built and loaded the
way backend/loader.py does it (weights from tests/forge_common/harness_conventions.py), and the stacked
prompt conds that `sampling_function` reads."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests.forge_common.harness_conventions import fill_random_, random_weights


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


def parameter_shapes(make_model: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Names and shapes of every parameter, in state-dict order, from a meta build with plain torch
    layers (they have the same parameters as Forge's operations)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in make_model().state_dict().items()}


def build_like_loader(
    forge,
    make_model: Callable[[], torch.nn.Module],
    config: dict,
    seed: int,
    dtype: torch.dtype,
    device: str | None = None,
):
    """A diffusion model built as backend/loader.py builds a UNet/transformer component: devices from
    memory_management, layers from `using_forge_operations`, `load_state_dict`, the config and the
    dtype/device attributes that KModel and the patcher read. Weights from `random_weights`, or, with a
    `device` (a full-size model on a GPU), drawn there with the same distributions."""
    if device not in (None, "cpu"):
        return _build_on_device(forge, make_model, config, seed, dtype, device)
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


def _build_on_device(forge, make_model, config: dict, seed: int, dtype: torch.dtype, device: str):
    """Forge's layers made on `device` in `dtype`, every parameter drawn in place there (random_weights'
    distributions, other numbers), so a 12B model needs no host copy."""
    with forge.operations.using_forge_operations(device=device, dtype=dtype, manual_cast_enabled=False):
        dm = make_model().to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for key, param in dm.named_parameters():
            fill_random_(key, param, gen)
    if hasattr(dm, "_internal_dict"):
        dm._internal_dict = config
    else:
        dm.config = config
    dm.storage_dtype = dm.computation_dtype = dtype
    dm.load_device = dm.initial_device = torch.device(device)
    dm.offload_device = forge.memory_management.unet_offload_device()
    return dm
