"""Forge's PredictionFlux (rectified flow, 'const' prediction), reduced to what sampling uses.

x_in = x (no input scaling); denoised = x - model_output * sigma; timestep(sigma) = sigma;
noise_scaling = sigma * noise + (1 - sigma) * latent. `sigmas` holds 10000 shifted sigmas
t -> e^mu / (e^mu + 1/t - 1) for t = 1/10000 .. 1, ascending, as in Forge.
Simplified: no other prediction types, no diffusers-scheduler construction.
"""

import math

import torch


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


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
