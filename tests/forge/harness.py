"""Real-Forge test harness: tiny random-weight FLUX and SDXL models built from a Forge checkout's own code.

Everything that matters is Forge's: the model classes (`backend.nn.flux`, `backend.nn.unet`), the operations
swap (`backend.operations.using_forge_operations`), the wrapping (`KModel` in `UnetPatcher.from_model`, with
the FLUX predictor or, for SDXL, the EPS predictor made from the bundled diffusers scheduler), the LoRA key
map and patch building (`model_lora_keys_unet`, `load_lora`, `ModelPatcher.add_patches`), the merge
(`sampling_prepare` -> `memory_management.load_models_gpu` -> `LoraLoader.refresh`) and the denoiser
(`backend.sampling.sampling_function.sampling_function`). This package is glue: it stands in for the webui
objects that `sampling_function` reads (`CFGDenoiser`, `p`, the stacked prompt conds). Model building lives in
harness_common.py, harness_flux.py and harness_sdxl.py; configs, random weights, LoRA files and conds, the
sigma schedule and the Euler loop follow tests/forge_common/harness_conventions.py, as the stand-in does;
the public methods are tests/forge_common/harness_interface.py's (the same for both tiers).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

from tests.forge import harness_flux, harness_sdxl
from tests.forge.harness_common import PromptConds
from tests.forge_common import harness_conventions as conventions
from tests.forge_common.harness_conventions import LoraFile, one_thread, simple_sigmas
from tests.forge_common.harness_interface import Harness

__all__ = ["FORGE_FLAGS", "ForgeHarness", "LoraFile", "import_forge", "simple_sigmas"]

FORGE_FLAGS = ("--always-cpu", "--attention-pytorch")


def import_forge(forge_dir: str | Path, flags: tuple[str, ...] = FORGE_FLAGS) -> SimpleNamespace:
    """Import Forge's backend from a checkout, on the CPU (or with other backend ``flags``, e.g. on a GPU).

    `backend.args` parses sys.argv once, at import, so the flags are put there for the import only.
    """
    root = Path(forge_dir).resolve()
    if not (root / "backend" / "nn" / "flux.py").is_file():
        raise FileNotFoundError(f"FORGE_DIR={root} does not look like a Forge checkout (no backend/nn/flux.py)")
    for path in (root / "packages_3rdparty", root):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))

    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "forge", *flags]
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

    if forge_args.args.always_cpu != ("--always-cpu" in flags):
        raise RuntimeError(f"backend.args was parsed before the harness could pass {' '.join(flags)}")
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


class ForgeHarness(Harness):
    """The real tier of the harness interface, on Forge's own backend code (CPU, float32)."""

    name = "forge"

    def __init__(self, forge_dir: str | Path, device: str | None = None):
        """``device`` None: Forge on the CPU (the tests); "cuda": Forge on the GPU, weights drawn there."""
        self.device = device
        self.forge = import_forge(forge_dir, FORGE_FLAGS if device in (None, "cpu") else ("--attention-pytorch",))
        self.flux_module: ModuleType = self.forge.flux  # backend.nn.flux
        self.unet_module: ModuleType = self.forge.unet_nn  # backend.nn.unet (module-level attention_function)
        self._lora: ModuleType = self.forge.lora  # backend.patcher.lora
        self.sampling_function_inner = self.forge.sampling.sampling_function_inner

    def model_kind(self, unet) -> str:
        """'sdxl' for a backend.nn.unet UNet, 'flux' for a FLUX transformer."""
        dm = unet.model.diffusion_model
        if isinstance(dm, self.forge.unet_nn.IntegratedUNet2DConditionModel):
            return "sdxl"
        if isinstance(dm, self.forge.flux.IntegratedFluxTransformer2DModel):
            return "flux"
        raise TypeError(f"unknown diffusion model {type(dm).__name__}")

    @one_thread()
    def _build_flux_unet(self, config: dict, seed: int, dtype: torch.dtype):
        """Built and wrapped the way backend/loader.py and diffusion_engine/flux.py do (harness_flux.py)."""
        return harness_flux.build_flux_unet(self.forge, config, seed, dtype, self.device)

    @one_thread()
    def _build_sdxl_unet(self, config: dict, seed: int, dtype: torch.dtype):
        """Built and wrapped the way backend/loader.py and diffusion_engine/sdxl.py do (harness_sdxl.py)."""
        return harness_sdxl.build_sdxl_unet(self.forge, config, seed, dtype, self.device)

    @one_thread()
    def _sample(self, unet, steps, cfg, batch, height, width, n_txt, seed, before_sampling, on_step, raise_at_step):
        """Through Forge's sampling_function, with the webui's CFGDenoiser, params and stacked conds stood in."""
        f = self.forge
        noise, cond, uncond = conventions.noise_and_conds(
            unet.model.diffusion_model,
            self.model_kind(unet),
            batch=batch,
            height=height,
            width=width,
            n_txt=n_txt,
            cfg=cfg,
            seed=seed,
        )
        if self.device not in (None, "cpu"):
            noise = noise.to(self.device)  # the conds follow x's device (Condition.process_cond)
        cond = PromptConds(cond)
        uncond = None if uncond is None else PromptConds(uncond)

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

            def denoise(i: int, x: torch.Tensor) -> torch.Tensor:
                denoiser.step = i
                params = SimpleNamespace(  # fields of modules.script_callbacks.CFGDenoiserParams
                    x=x,
                    image_cond=image_cond,
                    sigma=sigmas[i] * x.new_ones(batch),  # [B]
                    sampling_step=i,
                    total_sampling_steps=steps,
                    text_cond=cond,
                    text_uncond=uncond,
                    denoiser=denoiser,
                )
                denoised, _, _ = f.sampling.sampling_function(
                    denoiser, denoiser_params=params, cond_scale=cfg, cond_composition=composition
                )
                return denoised

            x = conventions.euler_sample(x, sigmas, denoise, on_step, raise_at_step)
            f.sampling.sampling_cleanup(unet)
        return x.float().clone()

    def merged_weight(self, unet, key: str) -> torch.Tensor:
        """Parameter `key` (relative to the KModel) as the shared model holds it now (Forge's get_attr)."""
        return self.forge.utils.get_attr(unet.model, key).detach().float().clone()
