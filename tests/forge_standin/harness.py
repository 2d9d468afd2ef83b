"""The test Harness (see notes/harness_interface.md) on top of the stand-in Forge backend.

Build the harness only while the stand-in is installed (the `harness` fixture does); it imports the
`backend` modules when constructed, never at import time.

Configs, random weights, LoRA files, conds, the sigma schedule and the Euler loop follow
tests/forge_common/harness_conventions.py, as the real tier (tests/forge/harness.py) does, so both draw
the same numbers. What is the stand-in's own: the models are built directly from its classes with the
attributes backend/loader.py sets, SDXL's scheduler is the config Forge bundles (not read from disk), and
one denoising call does what Forge's sampling_function does for a single-prompt txt2img. The public
methods are tests/forge_common/harness_interface.py's (the same for both tiers).
"""

import importlib
from types import SimpleNamespace

import torch

from tests.forge_common import harness_conventions as conventions
from tests.forge_common.harness_conventions import LoraFile
from tests.forge_common.harness_interface import Harness

__all__ = ["SDXL_SCHEDULER", "LoraFile", "StandinHarness"]

# diffusers' EulerDiscreteScheduler config bundled with Forge for SDXL (only the fields Forge reads):
# KModel builds the EPS Prediction from it (scaled_linear betas 0.00085 .. 0.012 over 1000 steps)
SDXL_SCHEDULER = SimpleNamespace(
    config=SimpleNamespace(
        prediction_type="epsilon",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
    )
)


class StandinHarness(Harness):
    """The stand-in tier of the harness interface (CPU, float32)."""

    name = "standin"

    def __init__(self):
        self.flux_module = importlib.import_module("backend.nn.flux")
        self._utils = importlib.import_module("backend.utils")
        self._lora = importlib.import_module("backend.patcher.lora")
        self._unet = importlib.import_module("backend.patcher.unet")
        self.unet_module = importlib.import_module("backend.nn.unet")
        self._prediction = importlib.import_module("backend.modules.k_prediction")
        self._memory = importlib.import_module("backend.memory_management")
        self._condition = importlib.import_module("backend.sampling.condition")
        self._sampling = importlib.import_module("backend.sampling.sampling_function")
        self.sampling_function_inner = self._sampling.sampling_function_inner

    # --- model -------------------------------------------------------------------------------------

    def _build_flux_unet(self, config: dict, seed: int, dtype: torch.dtype):
        """Built from the stand-in's classes, wrapped as diffusion_engine/flux.py does (KModel with the
        dev or schnell PredictionFlux, UnetPatcher)."""
        model = self.flux_module.IntegratedFluxTransformer2DModel(**config)
        self._load_random_weights(model, config, seed, dtype)
        repo, predictor_kwargs = conventions.flux_predictor(config["guidance_embed"])
        return self._unet.UnetPatcher.from_model(
            model,
            diffusers_scheduler=None,
            config=SimpleNamespace(huggingface_repo=repo),
            k_predictor=self._prediction.PredictionFlux(**predictor_kwargs),
        )

    def _build_sdxl_unet(self, config: dict, seed: int, dtype: torch.dtype):
        """Built from the stand-in's classes, wrapped as diffusion_engine/sdxl.py does (EPS predictor from
        the scheduler config, KModel, UnetPatcher)."""
        model = self.unet_module.IntegratedUNet2DConditionModel(**config)
        self._load_random_weights(model, config, seed, dtype)
        return self._unet.UnetPatcher.from_model(
            model,
            diffusers_scheduler=SDXL_SCHEDULER,
            config=SimpleNamespace(huggingface_repo=conventions.SDXL_REPO, unet_config=config),
        )

    @staticmethod
    def _load_random_weights(model, config: dict, seed: int, dtype) -> None:
        """Seeded weights (harness_conventions.random_weights), then what backend/loader.py sets on a
        freshly loaded diffusion model (all on the CPU here)."""
        shapes = {key: value.shape for key, value in model.state_dict().items()}
        model.load_state_dict(conventions.random_weights(shapes, seed, torch.float32))
        model.to(dtype)
        cpu = torch.device("cpu")
        model.storage_dtype = model.computation_dtype = dtype
        model.load_device = model.offload_device = model.initial_device = cpu
        model.config = config

    # --- inspection and sampling ----------------------------------------------------------------------

    def merged_weight(self, unet, key: str) -> torch.Tensor:
        """Parameter `key` (relative to the KModel) as the shared model holds it now."""
        return self._utils.get_attr(unet.model, key).detach().float().clone()

    def sigmas(self, unet, steps: int) -> torch.Tensor:
        """Forge's "Simple" schedule: `steps` sigmas evenly picked from the predictor's table, then 0."""
        return conventions.simple_sigmas(unet.model.predictor, steps)

    def _denoise(self, unet, x, sigma, cond, uncond, cfg: float, seed: int):
        """What Forge's sampling_function does per call, for a single-prompt txt2img."""
        model = unet.model
        model_options = unet.model_options
        uncond_c = self._condition.compile_conditions(uncond)
        cond_c = self._condition.compile_conditions(cond)
        cond_c[0]["strength"] = 1.0  # compile_weighted_conditions with one prompt of weight 1
        timestep = sigma
        for modifier in model_options.get("conditioning_modifiers", []):
            model, x, timestep, uncond_c, cond_c, cfg, model_options, seed = modifier(
                model, x, timestep, uncond_c, cond_c, cfg, model_options, seed
            )
        return self._sampling.sampling_function_inner(model, x, timestep, uncond_c, cond_c, cfg, model_options, seed)

    def _sample(self, unet, steps, cfg, batch, height, width, n_txt, seed, before_sampling, on_step, raise_at_step):
        """Through the stand-in's sampling_function_inner (see `_denoise`)."""
        dm, kind = unet.model.diffusion_model, self.model_kind(unet)
        with torch.inference_mode():  # Forge samples inside inference_mode (processing.py)
            noise, cond, uncond = conventions.noise_and_conds(
                dm, kind, batch=batch, height=height, width=width, n_txt=n_txt, cfg=cfg, seed=seed
            )
            sigmas = self.sigmas(unet, steps)
            x = unet.model.predictor.noise_scaling(sigmas[0], noise, torch.zeros_like(noise))
            if before_sampling is not None:
                unet = before_sampling(unet, sigmas, x, cond, uncond)
            self._memory.load_models_gpu([unet])  # sampling_prepare: merges this patcher's LoRA set
            ones = x.new_ones([batch])

            def denoise(i: int, x: torch.Tensor) -> torch.Tensor:
                return self._denoise(unet, x, sigmas[i] * ones, cond, uncond, cfg, seed)

            x = conventions.euler_sample(x, sigmas, denoise, on_step, raise_at_step)
        return x.float().clone()  # a normal tensor again (cloned outside inference mode)
