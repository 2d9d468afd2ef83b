"""Latent refinement per guided step at full model size, random weights, on whatever device is given.

One guided step is freefuse.refine.refine_x0 on a 1024x1024 latent (FLUX: 16 x 128 x 128, SDXL: 4 x 128 x 128):
the latent halved to 64 x 64, decoded to 512 x 512 by the family's full-size VAE decoder (Forge's
IntegratedAutoencoderKL with the released configs), the style term (CLIP ViT-H/14, Forge's config, at 224) and
two subject terms (DINOv2 ViT-B/14 at 224, one per subject crop), then one backward pass to the latent.

Reported side by side, median of the rounds after a warm-up round:
  VAE decode 512px      the decoder alone, no gradient (what a preview decode costs)
  decode fwd+bwd        the decoder with the backward pass to its input
  CLIP-H fwd+bwd        the style term
  DINOv2-B fwd+bwd x2   the two subject terms
  refinement step       all of it, as a generation runs it
and the step as a multiple of the plain decode. The cost relative to a denoiser step comes from
bench_blocks.py's per-block times (README, Known costs).

    FORGE_DIR=/path/to/forge python3 benchmarks/bench_refine.py [--family flux|sdxl|both] [--rounds 2]
        [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from freefuse import refine  # noqa: E402

VAE = {  # the released VAE configs (diffusers' config.json of each), as Forge builds IntegratedAutoencoderKL
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, shift_factor=0.0),
    "flux": dict(
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    ),
}
COMMON_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    up_block_types=("UpDecoderBlock2D",) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
)  # fmt: skip
DINOV2_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=14,
                image_size=224)  # fmt: skip


def _random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random weights (no checkpoint exists here): std 0.02, norms at one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval().requires_grad_(False)


def build_models(family: str, device, dtype, tiny: bool):
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.patcher import clipvision
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    if tiny:  # the script's code paths at toy sizes (its test)
        from tests.tiny.encoders import CLIP_CONFIG, DINO_CONFIG

        vae_config = dict(COMMON_VAE, block_out_channels=(32, 32), up_block_types=("UpDecoderBlock2D",) * 2,
                          down_block_types=("DownEncoderBlock2D",) * 2)  # fmt: skip
        clip_config, dino_config = CLIP_CONFIG, DINO_CONFIG
    else:
        vae_config, clip_config, dino_config = COMMON_VAE, clipvision.CLIP_VISION_H, DINOV2_B
    vae = IntegratedAutoencoderKL(**vae_config, **VAE[family])
    vae.encoder = None  # only the decoder runs
    decoder = _Decode(_random_(vae, 1)).to(device=device, dtype=dtype)
    clip = _random_(CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_config)), 2).to(device, dtype)
    dino = _random_(Dinov2Model(Dinov2Config(**dino_config)), 3).to(device, dtype)
    return decoder, refine.clip_encoder(clip, "CLIP-H"), refine.dino_encoder(dino, "DINOv2-B")


class _Decode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        z = self.vae.process_out(z).to(next(self.vae.parameters()).dtype)
        return ((self.vae.decode(z).float() + 1.0) / 2.0).clamp(0.0, 1.0)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def cases(family: str, device, dtype, tiny: bool) -> dict:
    decoder, clip, dino = build_models(family, device, dtype, tiny)
    channels, side = VAE[family]["latent_channels"], 16 if tiny else 128
    x0 = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    half = torch.nn.functional.avg_pool2d(x0, 2)
    refs = torch.rand(3, 3, 512, 512, generator=torch.Generator().manual_seed(1)).to(device)
    targets = refine.Targets(
        clip,
        refine.anchor(clip, [refs[0]]),
        [
            refine.SubjectTarget(dino, refine.anchor(dino, [refs[1]]), [(0.1, 0.9, 0.0, 0.5)]),
            refine.SubjectTarget(dino, refine.anchor(dino, [refs[2]]), [(0.1, 0.9, 0.5, 1.0)]),
        ],
    )

    def decode_only():
        with torch.no_grad():
            decoder(half)

    def decode_backward():
        z = half.clone().requires_grad_(True)
        torch.autograd.grad(decoder(z).mean(), z)

    def encoder_backward(encoder, n):
        def run():
            image = torch.rand(n, 3, 512, 256, device=device, requires_grad=True)
            torch.autograd.grad(refine.embed(encoder, image).sum(), image)

        return run

    def step():
        refine.refine_x0(x0, decoder, targets, strength=0.03)

    return {
        "VAE decode 512px": decode_only,
        "decode fwd+bwd": decode_backward,
        "CLIP-H fwd+bwd": encoder_backward(clip, 1),
        "DINOv2-B fwd+bwd x2": encoder_backward(dino, 2),
        "refinement step": step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["flux", "sdxl", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: check the script runs, measure nothing")
    args = parser.parse_args()
    if not os.environ.get("FORGE_DIR", "").strip():
        sys.exit("set FORGE_DIR to a Forge checkout: the decoder is Forge's IntegratedAutoencoderKL")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_forge import harness_context

    with harness_context():  # Forge's backend imported as the real tier imports it
        run_all(args)


def run_all(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"torch {torch.__version__}, {device}, {dtype}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for family in ("flux", "sdxl") if args.family == "both" else (args.family,):
        runs = cases(family, device, dtype, args.tiny)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.rounds + 1):
            for name, fn in runs.items():
                seconds = timed(fn, device)
                if round_:  # the first round warms up
                    times[name].append(seconds)
        base = statistics.median(times["VAE decode 512px"])
        size = "toy" if args.tiny else "1024x1024"
        print(f"\n{family.upper()} {size} latent, one guided step (1 style + 2 subject references)")
        print(f"{'':24s}{'seconds':>10s}{'x decode':>10s}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:24s}{median:10.2f}{median / base:10.2f}")
        del runs


if __name__ == "__main__":
    main()
