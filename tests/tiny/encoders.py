"""Tiny random-weight image encoders and decoders for the refinement tests (nothing is downloaded).

CLIP and DINOv2 are built from ``transformers`` configs (hidden size 32, 2 layers, 32 px images), the decoder
is a 1x1 conv plus a 2x nearest upsample: the shapes and code paths of the real models at a tiny size.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
    patch_size=8, projection_dim=16,
)  # fmt: skip
DINO_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
)  # fmt: skip


def tiny_clip(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_CONFIG)).eval()


def tiny_dino(seed: int = 1):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**DINO_CONFIG)).eval()


def save_clip_folder(path: Path, seed: int = 0) -> Path:
    """A Hugging Face format CLIP vision folder (config.json + model.safetensors), as a user would place it."""
    tiny_clip(seed).save_pretrained(path, safe_serialization=True)
    return path


def save_dino_folder(path: Path, seed: int = 1) -> Path:
    tiny_dino(seed).save_pretrained(path, safe_serialization=True)
    return path


class TinyDecoder(torch.nn.Module):
    """latent [B, C, h, w] -> image [B, 3, 2h, 2w] in [0, 1]."""

    def __init__(self, channels: int = 4, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, 3, 1)

    def forward(self, z):
        return torch.sigmoid(torch.nn.functional.interpolate(self.conv(z), scale_factor=2.0))


class TinyFirstStage(torch.nn.Module):
    """The parts of Forge's IntegratedAutoencoderKL the refinement reads (process_out, decode, post_quant_conv,
    decoder.conv_in), for the stand-in tier, which has no backend.nn.vae."""

    def __init__(self, channels: int):
        super().__init__()
        self.post_quant_conv = torch.nn.Conv2d(channels, channels, 1)
        self.decoder = torch.nn.Sequential()
        self.decoder.conv_in = torch.nn.Conv2d(channels, 3, 3, padding=1)
        self.decoder.up = torch.nn.Upsample(scale_factor=2.0)
        self.scaling_factor, self.shift_factor = 0.5, 0.1

    def process_out(self, latent):
        return latent / self.scaling_factor + self.shift_factor

    def decode(self, z):
        return torch.tanh(self.decoder(self.post_quant_conv(z)))


def tiny_vae(channels: int, seed: int = 3):
    """A VAE as p.sd_model.forge_objects holds it: Forge's own IntegratedAutoencoderKL at a tiny size when
    Forge's backend is importable (the real tier), else TinyFirstStage; built in inference mode, as Forge's
    loader builds it."""
    from types import SimpleNamespace

    torch.manual_seed(seed)
    with torch.inference_mode():
        try:
            from backend.nn.vae import IntegratedAutoencoderKL

            first_stage = IntegratedAutoencoderKL(
                latent_channels=channels, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32,
                up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.3611, shift_factor=0.1159,
            )  # fmt: skip
        except ImportError:
            first_stage = TinyFirstStage(channels)
    return SimpleNamespace(first_stage_model=first_stage.eval(), vae_dtype=torch.float32)
