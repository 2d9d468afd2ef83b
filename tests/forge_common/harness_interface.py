"""The test Harness interface (notes/harness_interface.md) written once, so that both tiers take the same
arguments with the same defaults and make models and LoRA files by the same conventions
(harness_conventions.py). A tier (tests/forge_standin/harness.py, tests/forge/harness.py) subclasses
`Harness` and supplies only what calls its own backend.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from tests.forge_common import harness_conventions as conventions
from tests.forge_common.harness_conventions import LoraFile


class Harness:
    """Tiny random-weight FLUX and SDXL models, LoRA files, the LoRA merge and Euler sampling, on one tier.

    A tier sets `name`, `flux_module` (its backend.nn.flux), `unet_module` (backend.nn.unet), `_lora`
    (backend.patcher.lora) and `sampling_function_inner` (what extensions call to evaluate the model), and
    implements `_build_flux_unet`, `_build_sdxl_unet`, `_sample` and `merged_weight`.
    """

    name: str
    flux_module: ModuleType
    unet_module: ModuleType
    _lora: ModuleType
    sampling_function_inner: Callable  # backend.sampling.sampling_function.sampling_function_inner

    # --- what a tier supplies -------------------------------------------------------------------------

    def _build_flux_unet(self, config: dict, seed: int, dtype: torch.dtype):
        """A UnetPatcher around the FLUX of `config` (harness_conventions.flux_config) with seeded weights."""
        raise NotImplementedError

    def _build_sdxl_unet(self, config: dict, seed: int, dtype: torch.dtype):
        """A UnetPatcher around the UNet of `config` (harness_conventions.sdxl_unet_config), seeded weights."""
        raise NotImplementedError

    def _sample(self, unet, steps, cfg, batch, height, width, n_txt, seed, before_sampling, on_step, raise_at_step):
        """`sample` on this tier's sampling function (arguments as `sample` takes them)."""
        raise NotImplementedError

    def merged_weight(self, unet, key: str) -> torch.Tensor:
        """Parameter `key` (relative to the KModel, e.g. "diffusion_model.single_blocks.0.linear1.weight" or
        "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn2.to_q.weight") as the shared model
        holds it now (after the last merge)."""
        raise NotImplementedError

    def model_kind(self, unet) -> str:
        """'sdxl' for a UNet, 'flux' for a FLUX transformer."""
        return conventions.model_kind(unet.model.diffusion_model)

    # --- models ---------------------------------------------------------------------------------------

    def make_flux_unet(
        self,
        *,
        n_double: int = 3,
        n_single: int = 2,
        hidden: int = 64,
        heads: int = 2,
        context_dim: int = 32,
        vec_dim: int = 16,
        guidance: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        """A tiny random FLUX (the dev predictor with guidance, schnell's without), in a UnetPatcher."""
        config = conventions.flux_config(
            n_double=n_double,
            n_single=n_single,
            hidden=hidden,
            heads=heads,
            context_dim=context_dim,
            vec_dim=vec_dim,
            guidance=guidance,
        )
        return self._build_flux_unet(config, seed, dtype)

    def make_sdxl_unet(
        self,
        *,
        model_channels: int = 32,
        transformer_depth: tuple[int, ...] = (0, 0, 1, 1, 2, 2),
        transformer_depth_middle: int = 1,
        transformer_depth_output: tuple[int, ...] = (0, 0, 0, 1, 1, 1, 2, 2, 2),
        channel_mult: tuple[int, ...] = (1, 2, 4),
        num_head_channels: int = 16,
        context_dim: int = 32,
        adm_in_channels: int = 16,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        """A tiny random SDXL-layout UNet with the EPS predictor, in a UnetPatcher (layout: the
        harness_conventions module docstring)."""
        config = conventions.sdxl_unet_config(
            model_channels=model_channels,
            transformer_depth=transformer_depth,
            transformer_depth_middle=transformer_depth_middle,
            transformer_depth_output=transformer_depth_output,
            channel_mult=channel_mult,
            num_head_channels=num_head_channels,
            context_dim=context_dim,
            adm_in_channels=adm_in_channels,
        )
        return self._build_sdxl_unet(config, seed, dtype)

    # --- LoRAs ----------------------------------------------------------------------------------------

    def make_lora(
        self,
        unet,
        *,
        name: str,
        rank: int = 4,
        fmt: str = "kohya",
        seed: int = 0,
        targets: str = "all",
        scale: float = 0.5,
    ) -> LoraFile:
        """A random LoRA for `unet`'s model (harness_conventions.make_lora_file): kohya (FLUX or SDXL) or
        diffusers (FLUX only); FLUX targets "all" | "attn", SDXL "all" (with LoCon ResBlock convs) |
        "linear" | "attn"."""
        return conventions.make_lora_file(
            unet.model.diffusion_model,
            self.model_kind(unet),
            name=name,
            rank=rank,
            fmt=fmt,
            seed=seed,
            targets=targets,
            scale=scale,
        )

    def add_loras(self, unet, loras: list[tuple[LoraFile, float]]):
        """The unet half of Forge's networks.load_lora_for_models, one LoRA after another, on this tier's
        backend.patcher.lora (harness_conventions.add_loras_like_networks). The input is not modified."""
        return conventions.add_loras_like_networks(self._lora, unet, loras)

    # --- sampling -------------------------------------------------------------------------------------

    def sample(
        self,
        unet,
        *,
        steps: int = 4,
        cfg: float = 1.0,
        batch: int = 1,
        height: int = 64,
        width: int = 64,
        n_txt: int | None = None,
        seed: int = 0,
        before_sampling: Callable | None = None,
        on_step: Callable[[int], None] | None = None,
        raise_at_step: int | None = None,
    ) -> torch.Tensor:
        """Euler txt2img sampling through the tier's sampling function, in inference mode as processing.py
        runs it; the final latent [B, C, H/8, W/8] (C = 16 for FLUX, 4 for SDXL), float32. `n_txt`
        defaults to 8 (FLUX) or 77 (SDXL, where it must be a multiple of 77). Order of events: noise and
        conds (harness_conventions.noise_and_conds), x = noise * sigmas[0], `before_sampling(unet, sigmas,
        x, cond, uncond)` (may return another patcher), the LoRA merge, then per step `on_step(i)`, the
        interruption at `raise_at_step`, the denoiser and the Euler update."""
        return self._sample(
            unet, steps, cfg, batch, height, width, n_txt, seed, before_sampling, on_step, raise_at_step
        )
