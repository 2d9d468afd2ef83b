"""Real-Forge test harness: tiny random-weight FLUX and SDXL models built from a Forge checkout's own code.

Everything that matters is Forge's: the model classes (`backend.nn.flux`, `backend.nn.unet`), the operations
swap (`backend.operations.using_forge_operations`), the wrapping (`KModel` in `UnetPatcher.from_model`, with
the FLUX predictor or, for SDXL, the EPS predictor made from the bundled diffusers scheduler), the LoRA key
map and patch building (`model_lora_keys_unet`, `load_lora`, `ModelPatcher.add_patches`), the merge
(`sampling_prepare` -> `memory_management.load_models_gpu` -> `LoraLoader.refresh`) and the denoiser
(`backend.sampling.sampling_function.sampling_function`). This package is glue: it makes random weights and
LoRA files, and stands in for the webui objects that `sampling_function` reads (`CFGDenoiser`, `p`, the
stacked prompt conds). FLUX specifics live in harness_flux.py, SDXL specifics in harness_sdxl.py.

Interface: /work/notes/harness_interface.md (same as tests/forge_standin/harness.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

from tests.forge import harness_flux, harness_sdxl
from tests.forge.harness_common import LoraFile, one_thread, random_lora_factors, simple_sigmas

__all__ = ["FORGE_FLAGS", "ForgeHarness", "LoraFile", "import_forge", "simple_sigmas"]

FORGE_FLAGS = ("--always-cpu", "--attention-pytorch")
DEFAULT_N_TXT = {"flux": 8, "sdxl": harness_sdxl.CLIP_CHUNK_TOKENS}


def import_forge(forge_dir: str | Path) -> SimpleNamespace:
    """Import Forge's backend from a checkout, on the CPU.

    `backend.args` parses sys.argv once, at import, so the flags are put there for the import only.
    """
    root = Path(forge_dir).resolve()
    if not (root / "backend" / "nn" / "flux.py").is_file():
        raise FileNotFoundError(f"FORGE_DIR={root} does not look like a Forge checkout (no backend/nn/flux.py)")
    for path in (root / "packages_3rdparty", root):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))

    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "forge", *FORGE_FLAGS]
    try:
        import backend.args as forge_args
        import backend.memory_management as memory_management
        import backend.modules.k_prediction as k_prediction
        import backend.nn.flux as flux
        import backend.nn.unet as unet_nn
        import backend.operations as operations
        import backend.patcher.lora as lora
        import backend.patcher.unet as unet
        import backend.sampling.sampling_function as sampling_function
        import backend.state_dict as state_dict
        import backend.utils as utils
    finally:
        sys.argv = saved_argv

    if not forge_args.args.always_cpu:
        raise RuntimeError("backend.args was parsed before the harness could pass --always-cpu")
    return SimpleNamespace(
        root=root,
        flux=flux,
        unet_nn=unet_nn,
        operations=operations,
        memory_management=memory_management,
        k_prediction=k_prediction,
        lora=lora,
        unet=unet,
        sampling=sampling_function,
        state_dict=state_dict,
        utils=utils,
    )


class ForgeHarness:
    """The real tier of the harness interface, on Forge's own backend code (CPU, float32)."""

    name = "forge"

    def __init__(self, forge_dir: str | Path):
        self.forge = import_forge(forge_dir)
        self.flux_module: ModuleType = self.forge.flux  # backend.nn.flux
        self.unet_module: ModuleType = self.forge.unet_nn  # backend.nn.unet (module-level attention_function)

    def model_kind(self, unet) -> str:
        """'sdxl' for a backend.nn.unet UNet, 'flux' for a FLUX transformer."""
        dm = unet.model.diffusion_model
        if isinstance(dm, self.forge.unet_nn.IntegratedUNet2DConditionModel):
            return "sdxl"
        if isinstance(dm, self.forge.flux.IntegratedFluxTransformer2DModel):
            return "flux"
        raise TypeError(f"unknown diffusion model {type(dm).__name__}")

    # ------------------------------------------------------------------ models
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
        """A tiny random FLUX built and wrapped the way backend/loader.py and diffusion_engine/flux.py do."""
        config = harness_flux.flux_config(
            n_double=n_double,
            n_single=n_single,
            hidden=hidden,
            heads=heads,
            context_dim=context_dim,
            vec_dim=vec_dim,
            guidance=guidance,
        )
        with one_thread():
            return harness_flux.build_flux_unet(self.forge, config, seed, dtype)

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
        """A tiny random SDXL-layout UNet built and wrapped the way backend/loader.py and
        diffusion_engine/sdxl.py do (see harness_sdxl.py for the layout)."""
        config = harness_sdxl.sdxl_unet_config(
            model_channels=model_channels,
            transformer_depth=transformer_depth,
            transformer_depth_middle=transformer_depth_middle,
            transformer_depth_output=transformer_depth_output,
            channel_mult=channel_mult,
            num_head_channels=num_head_channels,
            context_dim=context_dim,
            adm_in_channels=adm_in_channels,
        )
        with one_thread():
            return harness_sdxl.build_sdxl_unet(self.forge, config, seed, dtype)

    # ------------------------------------------------------------------ LoRAs
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
        """A random LoRA for `unet`'s model, layers in module order, factors from `random_lora_factors`.
        kohya: `lora_unet_<module>` with lora_down/lora_up/alpha (alpha = rank/2); diffusers (FLUX only):
        `transformer.<diffusers name>.lora_A/B` without alpha. FLUX targets "all" | "attn"
        (see harness_flux.flux_lora_targets); SDXL targets "all" | "linear" | "attn"
        (see harness_sdxl.sdxl_lora_targets; "all" adds LoCon ResBlock convs)."""
        if fmt not in ("kohya", "diffusers"):
            raise ValueError(f"fmt must be 'kohya' or 'diffusers', not {fmt!r}")
        dm = unet.model.diffusion_model
        if self.model_kind(unet) == "sdxl":
            if fmt != "kohya":
                raise ValueError("SDXL LoRAs are made in kohya format only")
            shapes = harness_sdxl.sdxl_lora_targets(dm, targets)
        else:
            shapes = harness_flux.flux_lora_targets(self.forge, dm, fmt, targets)
        gen = torch.Generator().manual_seed(seed)
        sd: dict[str, torch.Tensor] = {}
        for prefix, shape in shapes.items():
            down, up = random_lora_factors(torch.Size(shape), rank, scale, gen)  # [r, in(, kh, kw)], [out, r(, 1, 1)]
            if fmt == "kohya":
                sd[f"{prefix}.lora_down.weight"] = down
                sd[f"{prefix}.lora_up.weight"] = up
                sd[f"{prefix}.alpha"] = torch.tensor(rank / 2.0)
            else:
                sd[f"{prefix}.lora_A.weight"] = down
                sd[f"{prefix}.lora_B.weight"] = up
        return LoraFile(filename=f"{name}.safetensors", name=name, state_dict=sd)

    def add_loras(self, unet, loras: list[tuple[LoraFile, float]]):
        """The unet half of extensions-builtin/sd_forge_lora/networks.py load_lora_for_models, per LoRA:
        Forge's key map, Forge's load_lora, clone, add_patches (offline). The input is not modified."""
        lora_mod = self.forge.lora
        for lora_file, weight in loras:
            key_map = lora_mod.model_lora_keys_unet(unet.model)  # called as networks.py:18 calls it
            patches, unmatched = lora_mod.load_lora(lora_file.state_dict, key_map)
            if len(unmatched) > 12:  # networks.py:25-27: "version mismatch", LoRA skipped
                continue
            if not patches:
                continue
            new_unet = unet.clone()
            loaded = new_unet.add_patches(
                filename=lora_file.filename, patches=patches, strength_patch=weight, online_mode=False
            )
            skipped = [k for k in patches if k not in loaded]
            if len(skipped) <= 12:  # networks.py:38-42
                unet = new_unet
        return unet

    # ------------------------------------------------------------------ sampling
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
        """Euler sampling through Forge's sampling_function, in inference mode as processing.py runs it.
        `n_txt` defaults to 8 (FLUX) or 77 (SDXL, where it must be a multiple of 77)."""
        with one_thread():
            return self._sample(
                unet, steps, cfg, batch, height, width, n_txt, seed, before_sampling, on_step, raise_at_step
            )

    def _sample(self, unet, steps, cfg, batch, height, width, n_txt, seed, before_sampling, on_step, raise_at_step):
        f = self.forge
        kind = self.model_kind(unet)
        dm = unet.model.diffusion_model
        channels, make_conds = {
            "flux": (harness_flux.LATENT_CHANNELS, harness_flux.flux_conds),
            "sdxl": (harness_sdxl.LATENT_CHANNELS, harness_sdxl.sdxl_conds),
        }[kind]
        n_txt = DEFAULT_N_TXT[kind] if n_txt is None else n_txt
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(batch, channels, height // 8, width // 8, generator=gen)  # [B, C, H/8, W/8]
        cond = make_conds(dm, batch, n_txt, gen)
        uncond = make_conds(dm, batch, n_txt, gen) if cfg != 1.0 else None  # processing.py: uc=None at CFG 1

        with torch.inference_mode():
            predictor = unet.model.predictor
            sigmas = simple_sigmas(predictor, steps)
            x = predictor.noise_scaling(sigmas[0], noise, torch.zeros_like(noise))  # = noise * sigmas[0]
            if before_sampling is not None:
                unet = before_sampling(unet, sigmas, x, cond, uncond)
            f.sampling.sampling_prepare(unet, x=x)  # load_models_gpu -> LoadedModel.model_load -> refresh_loras

            denoiser = SimpleNamespace(  # the parts of CFGDenoiser that sampling_function reads
                inner_model=SimpleNamespace(inner_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=unet))),
                p=SimpleNamespace(seeds=[seed]),
                step=0,
                total_steps=steps,
            )
            composition = [[(row, 1.0)] for row in range(batch)]  # one prompt, weight 1, per image
            image_cond = x.new_zeros(batch, 5, 1, 1)  # txt2img dummy image conditioning (ignored)
            for i in range(steps):
                denoiser.step = i
                if on_step is not None:
                    on_step(i)
                if raise_at_step == i:
                    raise RuntimeError("interrupted")
                sigma = sigmas[i] * x.new_ones(batch)  # [B]
                params = SimpleNamespace(  # fields of modules.script_callbacks.CFGDenoiserParams
                    x=x,
                    image_cond=image_cond,
                    sigma=sigma,
                    sampling_step=i,
                    total_sampling_steps=steps,
                    text_cond=cond,
                    text_uncond=uncond,
                    denoiser=denoiser,
                )
                denoised, _, _ = f.sampling.sampling_function(
                    denoiser, denoiser_params=params, cond_scale=cfg, cond_composition=composition
                )
                x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])  # Euler
            f.sampling.sampling_cleanup(unet)
        return x.float().clone()

    # ------------------------------------------------------------------ inspection
    def merged_weight(self, unet, key: str) -> torch.Tensor:
        """Parameter `key` (relative to the KModel, e.g. "diffusion_model.single_blocks.0.linear1.weight" or
        "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn2.to_q.weight") as the shared model
        holds it now."""
        return self.forge.utils.get_attr(unet.model, key).detach().float().clone()
