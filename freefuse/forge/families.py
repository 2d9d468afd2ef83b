"""Which model family a Forge denoiser belongs to; each family knows its layers, capture point and bias."""

from __future__ import annotations

from freefuse.forge.flux import FluxFamily
from freefuse.forge.sdxl import SdxlFamily

FAMILIES = (FluxFamily, SdxlFamily)


def detect_family(diffusion_model):
    """A fresh family object for this denoiser (FLUX or an SDXL-layout UNet), or None."""
    for family in FAMILIES:
        if family.matches(diffusion_model):
            return family()
    return None


def family_name(diffusion_model) -> str | None:
    family = detect_family(diffusion_model)
    return None if family is None else family.name
