"""Names and request bodies the webui tests share: tiny sizes and few steps, so a generation takes about a second.

Checkpoints are named without extension; LoRAs by file stem (see sizes.py for what fits which checkpoint).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from tests.webui import sizes

FLUX_CHECKPOINTS = list(sizes.FLUX)  # flux_a, flux_b (other width and seed), flux_c (flux_a's widths)
SDXL_CHECKPOINTS = list(sizes.SDXL)  # sdxl_a, sdxl_b (other width and seed)
GGUF_CHECKPOINTS = list(sizes.GGUF)  # flux_a_Q8_0, flux_a_Q4_0, flux_a_Q4_K: flux_a's transformer, quantised
GGUF_MODULES = list(sizes.GGUF_MODULES)  # the separate VAE, CLIP-L and T5 files a GGUF checkpoint needs
FP8 = "float8-e4m3fn"  # a forge_unet_storage_dtype ("Diffusion in Low Bits") choice; see WebuiClient.select_model
FP16_LORA = "Automatic (fp16 LoRA)"  # LoRAs on flux_a_Q4_K need it (Forge cannot re-quantise Q4_K)
FLUX_SUBJECT_LORAS = list(sizes.FLUX_SUBJECT_LORAS)  # harry, daiyu (fit flux_a)
FLUX_STYLE_LORAS = list(sizes.FLUX_STYLE_LORAS)  # watercolor (fits flux_a)
SDXL_SUBJECT_LORAS = list(sizes.SDXL_SUBJECT_LORAS)  # asuka, rei (fit sdxl_a)
SDXL_STYLE_LORAS = list(sizes.SDXL_STYLE_LORAS)  # inkwash (fits sdxl_a)
TEXT_ENCODER_LORAS = list(sizes.TEXT_ENCODER_LORAS)  # clip_l_te (CLIP-L only; fits every checkpoint)

FLUX_SUBJECTS_PROMPT = "<lora:harry:1> <lora:daiyu:1> photo of harry and daiyu"
SDXL_SUBJECTS_PROMPT = "<lora:asuka:1> <lora:rei:1> asuka and rei on a bench"

# FLUX preset values (Euler / Simple, CFG 1, distilled CFG 3.5)
FLUX_TXT2IMG = {
    "steps": 6,
    "width": 64,
    "height": 64,
    "seed": 1,
    "sampler_name": "Euler",
    "scheduler": "Simple",
    "cfg_scale": 1.0,
    "distilled_cfg_scale": 3.5,
}
# SDXL with CFG > 1 (uncond rows); 12 steps: FreeFuse's SDXL capture step defaults to 9
SDXL_TXT2IMG = {
    "steps": 12,
    "width": 64,
    "height": 64,
    "seed": 1,
    "sampler_name": "Euler",
    "scheduler": "Simple",
    "cfg_scale": 5.0,
}


def freefuse(**settings: Any) -> dict[str, Any]:
    """alwayson_scripts entry turning FreeFuse on, with named settings (the dict form of its API args)."""
    return {"FreeFuse": {"args": [{"enabled": True, **settings}]}}


def fail_at_step(step: int) -> dict[str, Any]:
    """alwayson_scripts entry of the test failure extension: a RuntimeError inside sampling at `step`."""
    return {"FreeFuse test failure": {"args": [step]}}


def pixels(image: Image.Image) -> np.ndarray:
    """[H, W, 3] float64 RGB values 0-255."""
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())
