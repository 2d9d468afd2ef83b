"""Forge's KModel: holds the transformer as `.diffusion_model` and turns (x, sigma, conds) into x0.

Without a k_predictor the predictor comes from `diffusers_scheduler` (its `.config`: prediction_type,
beta_schedule, beta_start, beta_end, num_train_timesteps), as Forge's SDXL engine builds it.
Simplified: no memory estimation by attention backend.
"""

import torch

from backend.modules.k_prediction import k_prediction_from_diffusers_scheduler


class KModel(torch.nn.Module):
    def __init__(self, model, diffusers_scheduler, k_predictor=None, config=None):
        super().__init__()
        self.config = config
        self.storage_dtype = model.storage_dtype
        self.computation_dtype = model.computation_dtype
        self.diffusion_model = model
        if k_predictor is None:
            k_predictor = k_prediction_from_diffusers_scheduler(diffusers_scheduler)
        self.predictor = k_predictor

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        """x [B, C, h, w], t = sigma [B]; kwargs such as y / guidance are cast to the compute dtype."""
        transformer_options = {} if transformer_options is None else transformer_options
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        dtype = self.computation_dtype
        xc = xc.to(dtype)
        t = self.predictor.timestep(t).float()
        context = c_crossattn.to(dtype)
        extra_conds = {}
        for name, value in kwargs.items():
            if hasattr(value, "dtype") and value.dtype not in (torch.int, torch.long):
                value = value.to(dtype)
            extra_conds[name] = value
        model_output = self.diffusion_model(
            xc, t, context=context, control=control, transformer_options=transformer_options, **extra_conds
        ).float()
        return self.predictor.calculate_denoised(sigma, model_output, x)

    def memory_required(self, input_shape):
        return 0
