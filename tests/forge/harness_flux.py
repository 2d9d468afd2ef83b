"""FLUX half of the real-Forge harness: the tiny FLUX (config from harness_conventions.flux_config) built
as backend/loader.py builds it and wrapped as diffusion_engine/flux.py wraps it."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.forge.harness_common import build_like_loader
from tests.forge_common.harness_conventions import flux_predictor


def build_flux_unet(forge, config: dict, seed: int, dtype: torch.dtype, device: str | None = None):
    """The model as backend/loader.py builds it, in a UnetPatcher around a KModel with the dev or schnell
    PredictionFlux (harness_conventions.flux_predictor)."""
    dm = build_like_loader(
        forge, lambda: forge.flux.IntegratedFluxTransformer2DModel(**config), config, seed, dtype, device
    )
    repo, predictor_kwargs = flux_predictor(config["guidance_embed"])
    estimated_config = SimpleNamespace(huggingface_repo=repo, unet_config=config)
    return forge.unet.UnetPatcher.from_model(
        model=dm,
        diffusers_scheduler=None,
        k_predictor=forge.k_prediction.PredictionFlux(**predictor_kwargs),
        config=estimated_config,
    )
