"""SDXL half of the real-Forge harness: the tiny SDXL-layout UNet (config and layout in
harness_conventions.sdxl_unet_config) built from backend/nn/unet.py and wrapped as diffusion_engine/sdxl.py
wraps it, with the scheduler Forge bundles for SDXL."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import torch

from tests.forge.harness_common import build_like_loader
from tests.forge_common.harness_conventions import SDXL_REPO


def bundled_scheduler(forge):
    """The SDXL scheduler as backend/loader.py loads it: the diffusers class named in the bundled
    model_index.json, `from_pretrained(<repo>/scheduler)`; SDXL is EPS, i.e. prediction_type 'epsilon'."""
    repo_dir = forge.root / "backend" / "huggingface" / SDXL_REPO
    lib_name, cls_name = json.loads((repo_dir / "model_index.json").read_text())["scheduler"]
    scheduler = getattr(importlib.import_module(lib_name), cls_name).from_pretrained(str(repo_dir / "scheduler"))
    if scheduler.config.prediction_type != "epsilon":
        raise RuntimeError(f"bundled SDXL scheduler is {scheduler.config.prediction_type}, expected epsilon")
    return scheduler


def build_sdxl_unet(forge, config: dict, seed: int, dtype: torch.dtype, device: str | None = None):
    """The UNet as backend/loader.py builds it (`from_config` under Forge's operations, then
    load_state_dict), wrapped as diffusion_engine/sdxl.py does: UnetPatcher.from_model with the diffusers
    scheduler, so KModel picks its predictor with k_prediction_from_diffusers_scheduler (EPS Prediction)."""
    model_cls = forge.unet_nn.IntegratedUNet2DConditionModel
    dm = build_like_loader(forge, lambda: model_cls.from_config(config), config, seed, dtype, device)
    estimated_config = SimpleNamespace(
        huggingface_repo=SDXL_REPO, unet_config=config, model_type=SimpleNamespace(name="EPS")
    )
    return forge.unet.UnetPatcher.from_model(
        model=dm, diffusers_scheduler=bundled_scheduler(forge), config=estimated_config
    )
