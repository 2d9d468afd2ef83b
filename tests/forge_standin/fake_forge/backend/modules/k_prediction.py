"""Forge's predictors: PredictionFlux (FLUX) and Prediction (discrete EPS, SD/SDXL), reduced.

PredictionFlux (rectified flow, 'const'): x_in = x; denoised = x - model_output * sigma;
timestep(sigma) = sigma; noise_scaling = sigma * noise + (1 - sigma) * latent. `sigmas` holds 10000
shifted sigmas t -> e^mu / (e^mu + 1/t - 1) for t = 1/10000 .. 1, ascending, as in Forge.

Prediction (what `k_prediction_from_diffusers_scheduler` builds for SDXL's EulerDiscreteScheduler config:
prediction_type 'epsilon', beta_schedule 'scaled_linear' -> 'linear', beta 0.00085 .. 0.012, 1000
steps): betas = linspace(sqrt(start), sqrt(end), T)^2 in float64, alphas_cumprod = cumprod(1 - betas),
sigmas = sqrt((1 - acp) / acp) ascending (float32); timestep(sigma) = index of the nearest log sigma
(a float tensor of integers 0..999); calculate_input = x / sqrt(sigma^2 + 1); denoised = x - eps * sigma;
noise_scaling = sigma * noise + latent.
Simplified: only the 'linear' beta schedule; no EDM / flow / v-prediction classes (v_prediction is
handled in calculate_denoised only); no diffusers import.
"""

import math

import torch


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


class Prediction(torch.nn.Module):
    def __init__(
        self,
        sigma_data=1.0,
        prediction_type="eps",
        beta_schedule="linear",
        linear_start=0.00085,
        linear_end=0.012,
        timesteps=1000,
    ):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):  # Forge asserts this list (plus 'const'/'edm')
            raise ValueError(f"stand-in Prediction: prediction_type {prediction_type!r}")
        if beta_schedule != "linear":
            raise NotImplementedError(f"stand-in Prediction: beta_schedule {beta_schedule!r}")
        self.sigma_data = sigma_data
        self.prediction_type = prediction_type
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        dists = sigma.log() - self.log_sigmas[:, None]  # [T, B]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        if self.prediction_type == "v_prediction":
            total = sigma**2 + self.sigma_data**2
            return model_input * self.sigma_data**2 / total - model_output * sigma * self.sigma_data / total**0.5
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        noise = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return noise + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


def k_prediction_from_diffusers_scheduler(scheduler):
    """Forge's choice for a diffusers scheduler config (SD/SDXL): a discrete Prediction."""
    config = scheduler.config
    if (
        getattr(config, "prediction_type", None) in ("epsilon", "v_prediction")
        and config.beta_schedule == "scaled_linear"
    ):
        return Prediction(
            sigma_data=1.0,
            prediction_type=config.prediction_type,
            beta_schedule="linear",
            linear_start=config.beta_start,
            linear_end=config.beta_end,
            timesteps=config.num_train_timesteps,
        )
    raise NotImplementedError(f"Failed to recognize {scheduler}")


class PredictionFlux(torch.nn.Module):
    def __init__(
        self,
        seq_len=4096,
        base_seq_len=256,
        max_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        pseudo_timestep_range=10000,
        mu=None,
    ):
        super().__init__()
        self.sigma_data = 1.0
        self.prediction_type = "const"
        self.pseudo_timestep_range = pseudo_timestep_range
        self.mu = mu if mu is not None else calculate_shift(seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        t = torch.arange(1, pseudo_timestep_range + 1, 1) / pseudo_timestep_range
        shifted = math.exp(self.mu) / (math.exp(self.mu) + (1 / t - 1))
        self.register_buffer("sigmas", shifted)

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return timestep

    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return 1.0 - percent
