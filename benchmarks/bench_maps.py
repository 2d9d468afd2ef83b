"""Time both mask methods at real model shapes, side by side in one run: the similarity maps alone, and the
whole mask computation (maps + balanced argmax / superpixel voting), as a user's capture step pays it.

    python benchmarks/bench_maps.py [--quick] [--device cpu|cuda|all] [--dtype float32|bfloat16]

Shapes (C = 2 subjects, batch 1 = the cond row):
* FLUX 1024x1024, double block: N_img 4096 (64x64), T 512, 24 heads x 128, o_img 3072; official with the
  image-axis softmax, logit scale 1/1000, tau 4000, EOS background; paper with text->image rows.
* SDXL 1024x1024, output_blocks.0 (32x32): N_img 1024, T 77, 20 heads x 64, o_img 1280; official with the
  text-axis softmax, scale 1/sqrt(64), tau 1000, no background; paper with image->text rows.

Wall time is the median of the repeats after one warm-up call. Peak memory as benchmarks/memory.py measures it
(CUDA's peak counter; on the CPU the rise of the peak resident set during one call).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import PeakMemory  # noqa: E402

from freefuse.maps import official_similarity_maps, paper_similarity_maps  # noqa: E402
from freefuse.masks import FLUX, SDXL, Capture, compute_masks  # noqa: E402
from freefuse.settings import FreeFuseSettings  # noqa: E402

SHAPES = {
    # name: (grid_hw, text tokens, heads, head dim, o_img features)
    "FLUX 1024^2": ((64, 64), 512, 24, 128, 3072),
    "SDXL 1024^2": ((32, 32), 77, 20, 64, 1280),
}
SUBJECTS = [list(range(10, 18)), list(range(30, 36))]  # 8 and 6 concept tokens
EOS = [60]


def measure(fn: Callable[[], object], device: str, repeats: int) -> tuple[float, float | None]:
    """(median seconds, peak extra MiB or None when it cannot be measured)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    with PeakMemory(device) as peak:
        fn()
    return statistics.median(times), None if peak.bytes is None else peak.bytes / 2**20


def inputs(name: str, device: str, dtype: torch.dtype) -> dict[str, object]:
    grid, n_txt, heads, dim, features = SHAPES[name]
    n_img = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return dict(
        grid=grid,
        q_img=rand(1, heads, n_img, dim),
        k_img=rand(1, heads, n_img, dim),
        q_txt=rand(1, heads, n_txt, dim),
        k_txt=rand(1, heads, n_txt, dim),
        o_img=rand(1, n_img, features),
        dim=dim,
    )


def mask_cases(name: str, x: dict[str, object]) -> dict[str, Callable[[], object]]:
    """Maps + partition through freefuse.masks.compute_masks, with the family's default settings."""
    family, traits = ("flux", FLUX) if name.startswith("FLUX") else ("sdxl", SDXL)
    capture = Capture(
        q_img=x["q_img"], k_img=x["k_img"], k_txt=x["k_txt"], o_img=x["o_img"], grid_hw=x["grid"], q_txt=x["q_txt"]
    )
    if family == "sdxl":
        capture.q_txt = None
    background = EOS if family == "flux" else None
    picture = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))  # the x0 latent's size
    official = FreeFuseSettings.defaults(family)
    paper = official.replace(mask_method="paper", slic_segments=1024)  # sqrt(1024 * 1024) pixels
    return {
        "official masks": lambda: compute_masks(capture, SUBJECTS, background, official, traits),
        "paper masks": lambda: compute_masks(capture, SUBJECTS, background, paper, traits, image=picture),
    }


def cases(name: str, x: dict[str, object]) -> dict[str, Callable[[], object]]:
    return {**map_cases(name, x), **mask_cases(name, x)}


def map_cases(name: str, x: dict[str, object]) -> dict[str, Callable[[], object]]:
    if name.startswith("FLUX"):
        return {
            "official": lambda: official_similarity_maps(
                x["q_img"], x["k_txt"], x["o_img"], SUBJECTS, EOS, logit_scale=1 / 1000, temperature=4000.0
            ),
            "paper": lambda: paper_similarity_maps(
                x["q_img"], x["k_img"], SUBJECTS, EOS, grid_hw=x["grid"], q_txt=x["q_txt"]
            ),
        }
    return {
        "official": lambda: official_similarity_maps(
            x["q_img"],
            x["k_txt"],
            x["o_img"],
            SUBJECTS,
            logit_scale=x["dim"] ** -0.5,
            temperature=1000.0,
            cross_softmax="text",
        ),
        "paper": lambda: paper_similarity_maps(
            x["q_img"], x["k_img"], SUBJECTS, grid_hw=x["grid"], k_txt=x["k_txt"], cross_direction="image_to_text"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 30 s on 2 CPU cores)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="input dtype")
    args = parser.parse_args()

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if not devices:
        sys.exit("CUDA requested but not available")
    dtype = getattr(torch, args.dtype)
    memory_kind = {"cpu": "peak RSS rise (VmHWM)", "cuda": "max_memory_allocated rise"}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, inputs {args.dtype}, C=2")
    header = f"{'shape':<12} {'device':<6} {'method':<15} {'median ms':>10} {'peak MiB':>9} {'vs official':>12}"
    print(header)
    print("-" * len(header))
    for device in devices:
        repeats = {"cpu": 3 if args.quick else 10, "cuda": 10 if args.quick else 50}[device]
        for name in SHAPES:
            x = inputs(name, device, dtype)
            results = {method: measure(fn, device, repeats) for method, fn in cases(name, x).items()}
            base = results["official"][0]
            for method, (seconds, peak) in results.items():
                peak_text = f"{peak:9.1f}" if peak is not None else f"{'n/a':>9}"
                ratio = f"{seconds / base:11.2f}x"
                print(f"{name:<12} {device:<6} {method:<15} {seconds * 1e3:10.1f} {peak_text} {ratio}")
            del x
    print("peak memory: " + "; ".join(f"{d}: {memory_kind[d]} during one call" for d in devices))
    print("'official'/'paper': similarity maps only; '... masks': maps + partition (what one capture costs);")
    print("'vs official' divides by the official maps' time. Inputs are random: timings, not quality.")


if __name__ == "__main__":
    main()
