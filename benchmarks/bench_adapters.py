"""Cost of masked runtime LoRA deltas: plain layer vs base + fused MaskedDelta vs base + per-LoRA loop.

All three are timed side by side in one run (interleaved, median of repeats after a warm-up) on FLUX and
SDXL layer shapes at 1024x1024, for LoRA ranks 16/32 and 2/4 LoRAs, with per-token subject weights.

    python3 benchmarks/bench_adapters.py --quick            # CPU: FLUX tokens / 64, SDXL / 16, 7 repeats
    python3 benchmarks/bench_adapters.py --device cuda      # bf16, full shapes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freefuse.adapters import LowRankFactor, MaskedDelta  # noqa: E402


@dataclass(frozen=True)
class LayerCase:
    model: str
    layer: str
    batch: int
    n_img: int  # image tokens
    n_txt: int  # text tokens in front (joint layout), 0 otherwise
    in_features: int
    slices: tuple[tuple[int, int], ...] | None  # (start, size) per factor of one LoRA; None = whole output
    out_features: int


H = 3072  # FLUX hidden size
QUICK_CPU_DIVISOR = {"flux": 64, "sdxl": 16}  # --quick on CPU: fewer tokens (every cost is linear in tokens)
CASES = [
    LayerCase("flux", "img_attn.qkv", 1, 4096, 0, H, ((0, H), (H, H), (2 * H, H)), 3 * H),
    LayerCase("flux", "single.linear1", 1, 4096, 512, H, ((0, H), (H, H), (2 * H, H), (3 * H, 4 * H)), 7 * H),
    LayerCase("flux", "img_attn.proj", 1, 4096, 0, H, None, H),
    LayerCase("sdxl", "attn.to_q 1280", 2, 1024, 0, 1280, None, 1280),
    LayerCase("sdxl", "attn.to_q 640", 2, 4096, 0, 640, None, 640),
]


def build_adapter(case: LayerCase, rank: int, n_lora: int, device, dtype) -> MaskedDelta:
    factors = []
    for owner in range(n_lora):
        for start, size in case.slices or ((0, case.out_features),):
            factors.append(
                LowRankFactor(
                    down=torch.randn(rank, case.in_features) / case.in_features**0.5,
                    up=torch.randn(size, rank) / rank**0.5,
                    scale=0.8,
                    owner=owner,
                    out_slice=None if case.slices is None else (start, size),
                )
            )
    return MaskedDelta(case.out_features, factors, device=device, dtype=dtype)


def subject_weights(batch: int, n_img: int, n_txt: int, n_lora: int, device, dtype) -> torch.Tensor:
    """[B, n_txt + n_img, A]: each image token belongs to one subject (bands), text rows all ones."""
    owner = torch.arange(n_img) * n_lora // n_img  # [N_img]
    image = F.one_hot(owner, n_lora).to(dtype)  # [N_img, A]
    text = torch.ones(n_txt, n_lora, dtype=dtype)  # [T, A]
    return torch.cat([text, image]).expand(batch, -1, -1).contiguous().to(device)


def timer(device: torch.device):
    def run(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


def bench_case(case: LayerCase, rank: int, n_lora: int, divisor: int, repeats: int, device, dtype) -> dict:
    n_img, n_txt = max(1, case.n_img // divisor), case.n_txt // divisor
    x = torch.randn(case.batch, n_txt + n_img, case.in_features, device=device, dtype=dtype)  # [B, L, in]
    w = torch.randn(case.out_features, case.in_features, device=device, dtype=dtype) / case.in_features**0.5
    adapter = build_adapter(case, rank, n_lora, device, dtype)
    weights = subject_weights(case.batch, n_img, n_txt, n_lora, device, dtype)  # [B, L, A]

    variants = {
        "plain": lambda: F.linear(x, w),
        "fused": lambda: adapter.add_to(F.linear(x, w), x, weights),
        "loop": lambda: F.linear(x, w) + adapter.reference(x, weights),
    }
    run = timer(device)
    for fn in variants.values():  # warm-up (also builds the reference cache)
        run(fn)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(run(fn))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"x": f"[{case.batch}, {n_txt + n_img}, {case.in_features}]", **med}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens on CPU and fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--token-divisor", type=int, default=None, help="divide every token count by this")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quick_cpu = args.quick and device.type == "cpu"
    repeats = args.repeats or (7 if args.quick else 10)
    torch.manual_seed(0)
    print(
        f"device={device} dtype={str(dtype).removeprefix('torch.')} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} repeats={repeats} (median ms; x = the shape actually timed)"
    )
    header = (
        f"{'model':5} {'layer':15} {'x':>18} {'out':>6} {'rank':>4} {'loras':>5} "
        f"{'plain':>9} {'fused':>9} {'loop':>9} {'fused/plain':>11} {'loop/fused':>10}"
    )
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    with torch.inference_mode():
        for case in CASES:
            divisor = args.token_divisor or (QUICK_CPU_DIVISOR[case.model] if quick_cpu else 1)
            for rank in (16, 32):
                for n_lora in (2, 4):
                    r = bench_case(case, rank, n_lora, divisor, repeats, device, dtype)
                    print(
                        f"{case.model:5} {case.layer:15} {r['x']:>18} {case.out_features:>6} {rank:>4} "
                        f"{n_lora:>5} {r['plain']:>9.2f} {r['fused']:>9.2f} {r['loop']:>9.2f} "
                        f"{r['fused'] / r['plain']:>11.3f} {r['loop'] / r['fused']:>10.2f}",
                        flush=True,
                    )
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
