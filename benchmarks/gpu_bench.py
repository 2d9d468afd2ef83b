"""One-command GPU benchmark: what FreeFuse costs in whole generations at full model size, FLUX and SDXL.

On a CUDA machine with a Forge checkout (its requirements installed):

    FORGE_DIR=/path/to/stable-diffusion-webui-forge python3 benchmarks/gpu_bench.py

builds, with Forge's own classes and random weights drawn on the GPU, a full-size FLUX.1-dev transformer (19
double / 38 single blocks, hidden 3072, 24 heads; bfloat16) and an SDXL UNet (the real SDXL config; float16),
each with two rank-16 subject LoRAs on every block layer, and samples through Forge's sampling function:

  FLUX  1024x1024, 28 Euler steps, CFG 1, 512 text tokens
  SDXL  1024x1024, 30 Euler steps, CFG 5 (cond and uncond in one batch), 77 text tokens

  merged                          the subject LoRAs merged into the weights (plain Forge, no FreeFuse)
  continue, bias channels / dense FreeFuse capturing during sampling; the attention bias as extra channels
                                  (the default) or as a dense mask
  restart, bias channels / dense  FreeFuse's default schedule (capture_step + 1 extra model evaluations)

and prints seconds per step (from the first step to the end: the LoRA merge and FreeFuse's install are not
in it), the ratio to merged, model evaluations, and the peak GPU memory during sampling; then the mask
computation (both methods, both families) timed on the GPU. Each variant runs once to warm up, then timed.
About three to four minutes on one H100/H200. Without CUDA it stops with a message; ``--tiny`` runs the same
code on the CPU with tiny models of the real layout (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_maps  # noqa: E402
from memory import PeakMemory, mib  # noqa: E402

from freefuse.forge import session as sessions  # noqa: E402
from freefuse.forge.session import Plan, Session, SubjectSpec  # noqa: E402
from freefuse.settings import FreeFuseSettings  # noqa: E402
from tests.forge_common.harness_conventions import FLUX1_WIDTHS, SDXL_DEPTHS, SDXL_WIDTHS  # noqa: E402

FULL = {
    "flux": dict(steps=28, size=1024, cfg=1.0, n_txt=512, dtype=torch.bfloat16),
    "sdxl": dict(steps=30, size=1024, cfg=5.0, n_txt=77, dtype=torch.float16),
}
TINY = {
    "flux": dict(steps=6, size=128, cfg=1.0, n_txt=16, dtype=torch.float32),
    "sdxl": dict(steps=10, size=128, cfg=5.0, n_txt=77, dtype=torch.float32),
}
VARIANTS = {  # name: (schedule or None for merged, bias form)
    "merged": (None, None),
    "continue, bias channels": ("continue", "channels"),
    "continue, bias dense": ("continue", "dense"),
    "restart, bias channels": ("restart", "channels"),
    "restart, bias dense": ("restart", "dense"),
}


def build(harness, family: str, tiny: bool, dtype: torch.dtype):
    if family == "flux":
        if tiny:
            return harness.make_flux_unet(n_double=19, n_single=38, hidden=64, heads=2, context_dim=32, dtype=dtype)
        return harness.make_flux_unet(n_double=19, n_single=38, **FLUX1_WIDTHS, dtype=dtype)
    if tiny:
        return harness.make_sdxl_unet(
            transformer_depth_output=(0, 0, 0, 1, 1, 1, 4, 4, 4), transformer_depth=(0, 0, 1, 1, 4, 4), dtype=dtype
        )
    return harness.make_sdxl_unet(**SDXL_WIDTHS, **SDXL_DEPTHS, dtype=dtype)  # SDXL base 1.0's UNet config


class Sampled:
    """One generation: seconds from the first step to the end, model evaluations, peak memory while sampling."""

    def __init__(self, device: str):
        self.device, self.evaluations, self.start = device, 0, None
        self.memory = PeakMemory(device)

    def count(self, module, args, kwargs):
        self.evaluations += 1

    def first_step(self, i: int):
        if i == 0:
            self.memory.__enter__()  # synchronizes on CUDA, so the clock starts with an idle GPU
            self.start = time.perf_counter()


def run(harness, unet, loras, family: str, spec: dict, variant: str, steps: int, device: str) -> Sampled:
    schedule, form = VARIANTS[variant]
    sampled = Sampled(device)

    def install(unet_, sigmas, x, cond, uncond):
        settings = FreeFuseSettings.defaults(family).replace(enabled=True, schedule=schedule)
        if settings.capture_step >= steps:
            settings = settings.replace(capture_step=steps // 3)
        subjects = [SubjectSpec(n, loras[n].filename, n, p) for n, p in (("A", [1, 2]), ("B", [4, 5]))]
        background = [10] if family == "flux" else None  # an end-of-prompt token
        session = Session(Plan(settings, subjects, background, spec["n_txt"], sigmas))
        session.bias.form = form
        patched = session.install(unet_)
        assert patched is not unet_, session.messages
        return patched

    handle = unet.model.diffusion_model.register_forward_pre_hook(sampled.count, with_kwargs=True)
    try:
        harness.sample(
            unet,
            steps=steps,
            height=spec["size"],
            width=spec["size"],
            n_txt=spec["n_txt"],
            cfg=spec["cfg"],
            seed=1,
            before_sampling=install if schedule else None,
            on_step=sampled.first_step,
        )
        if device == "cuda":
            torch.cuda.synchronize()  # the clock stops when the GPU is done, not when the queue is
        sampled.seconds = time.perf_counter() - sampled.start
        sampled.memory.__exit__(None, None, None)
    finally:
        handle.remove()
        sessions.close_active()
    return sampled


def bench_family(harness, family: str, spec: dict, device: str) -> None:
    started = time.perf_counter()
    base = build(harness, family, device == "cpu", spec["dtype"])
    loras = {n: harness.make_lora(base, name=n, rank=16, seed=i + 1) for i, n in enumerate("AB")}
    both = harness.add_loras(base, [(loras["A"], 1.0), (loras["B"], 1.0)])
    print(f"\n{family}: built in {time.perf_counter() - started:.0f} s; {spec['size']}x{spec['size']}, "
          f"{spec['steps']} steps, CFG {spec['cfg']:g}, {str(spec['dtype']).removeprefix('torch.')}")  # fmt: skip
    for variant in VARIANTS:  # warm-up: kernels, caches, the LoRA merge
        run(harness, both, loras, family, spec, variant, min(spec["steps"], 12), device)
    results = {variant: run(harness, both, loras, family, spec, variant, spec["steps"], device) for variant in VARIANTS}
    merged = results["merged"]
    print(f"  {'variant':26s} {'s/step':>8s} {'vs merged':>10s} {'model evals':>12s} {'peak memory':>12s}")
    for variant, r in results.items():
        extra = r.evaluations - merged.evaluations
        evals = f"{r.evaluations}" + (f" (+{extra})" if extra else "")
        print(
            f"  {variant:26s} {r.seconds / spec['steps']:8.3f} {r.seconds / merged.seconds:9.3f}x {evals:>12s} "
            f"{mib(r.memory.bytes):>12s}"
        )


def bench_masks(device: str, repeats: int) -> None:
    print(f"\nmask computation on {device} (random inputs at 1024x1024 shapes; median of {repeats} after a warm-up)")
    for name in bench_maps.SHAPES:
        x = bench_maps.inputs(name, device, torch.float32)
        for method, fn in bench_maps.mask_cases(name, x).items():
            seconds, peak = bench_maps.measure(fn, device, repeats)
            print(f"  {name:12s} {method:15s} {seconds * 1e3:8.1f} ms  peak {peak or 0:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of this script")
    parser.add_argument("--family", choices=["flux", "sdxl", "both"], default="both")
    args = parser.parse_args()
    forge_dir = os.environ.get("FORGE_DIR", "").strip()
    if not forge_dir:
        sys.exit("gpu_bench.py needs a Forge checkout: FORGE_DIR=/path/to/stable-diffusion-webui-forge")
    if not args.tiny and not torch.cuda.is_available():
        sys.exit(
            "gpu_bench.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine). "
            "For a CPU smoke test of the script, add --tiny."
        )
    device = "cpu" if args.tiny else "cuda"
    from tests.forge.harness import ForgeHarness

    harness = ForgeHarness(forge_dir, device=None if args.tiny else "cuda")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (tiny models)"
    print(f"FreeFuse GPU benchmark on {name}; torch {torch.__version__}; Forge backend {forge_dir}")
    specs = TINY if args.tiny else FULL
    families = ["flux", "sdxl"] if args.family == "both" else [args.family]
    with torch.inference_mode():
        for family in families:
            bench_family(harness, family, specs[family], device)
            torch.cuda.empty_cache() if device == "cuda" else None
    bench_masks(device, 2 if args.tiny else 20)


if __name__ == "__main__":
    main()
