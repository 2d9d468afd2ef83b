"""Full-size blocks on the CPU: FreeFuse's runtime subject LoRAs and attention bias against merged LoRAs.

FLUX: one double and one single block at FLUX.1's width (hidden 3072, 24 heads, context 4096) on 4096 image +
512 text tokens (1024x1024). SDXL: one transformer block (SpatialTransformer of depth 1) at SDXL's width on the
64x64 token grid (640 channels) and on the 32x32 grid (1280 channels), context 2048 x 77, CFG (2 rows). Each
block is timed inside a model call of a model with the real widths and one block per kind (Forge's classes when
FORGE_DIR is set, the stand-in's otherwise), so FreeFuse runs exactly as in a generation: hooks, fused runtime
deltas, attention swap. Random weights.

Variants, interleaved round by round, median of the rounds after a warm-up round:
  plain                no LoRA
  merged               two subject LoRAs of rank 16 merged into the weights (plain Forge without FreeFuse;
                       its cost does not depend on rank or count)
  FreeFuse C x rR      C subject LoRAs of rank R as masked runtime deltas, no attention bias
  + bias dense         two rank-16 subjects with the attention bias as a dense mask
  + bias channels      the same bias as extra query/key channels (the default)
  merged + style       the two subjects and a rank-16 style LoRA, all merged (plain Forge)
  + style sum/kl/klora two rank-16 subjects and a rank-16 style LoRA fused by that selector (no bias)
Ratios are against "merged", and for the style variants also against "FreeFuse 2 x r16" (the cost of fusing).
Peak memory is the heap in use during the block above its start (measured, see
benchmarks/memory.py).

    FORGE_DIR=/path/to/forge python3 benchmarks/bench_blocks.py [--family flux|sdxl|both] [--rounds 2]
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_forge import harness_context  # noqa: E402
from memory import PeakMemory, mib  # noqa: E402

from freefuse.forge import session as sessions  # noqa: E402
from freefuse.forge.session import Plan, Session, SubjectSpec  # noqa: E402
from freefuse.partition import SubjectMasks  # noqa: E402
from freefuse.settings import FreeFuseSettings  # noqa: E402
from tests.forge_common.harness_conventions import FLUX1_WIDTHS, SDXL_WIDTHS  # noqa: E402

FAMILIES = {
    "flux": dict(
        size=1024, n_txt=512, cfg=1.0, blocks={"double block": "double_blocks.0", "single block": "single_blocks.0"}
    ),
    "sdxl": dict(
        size=1024,
        n_txt=77,
        cfg=5.0,
        blocks={"block 64x64 (640 ch)": "input_blocks.4.1", "block 32x32 (1280 ch)": "input_blocks.7.1"},
    ),
}


class BlockTimer:
    """Wall time and peak memory of named submodules during model calls."""

    def __init__(self, root, paths: dict[str, str]):
        self.seconds = {name: 0.0 for name in paths}
        self.peak = {name: 0 for name in paths}
        self._handles = []
        for name, path in paths.items():
            module = root.get_submodule(path)
            self._handles.append(module.register_forward_pre_hook(self._start(name)))
            self._handles.append(module.register_forward_hook(self._stop(name)))

    def _start(self, name):
        def hook(module, args):
            self._memory = PeakMemory().__enter__()
            self._t0 = time.perf_counter()

        return hook

    def _stop(self, name):
        def hook(module, args, output):
            self.seconds[name] += time.perf_counter() - self._t0
            self._memory.__exit__(None, None, None)
            self.peak[name] = max(self.peak[name], self._memory.bytes or 0)

        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()


def build(harness, family: str):
    """The real widths, one block per kind (FLUX) / one transformer block per attention level (SDXL)."""
    if family == "flux":
        return harness.make_flux_unet(n_double=1, n_single=1, **FLUX1_WIDTHS)
    one_each = dict(
        transformer_depth=(0, 0, 1, 1, 1, 1), transformer_depth_middle=1, transformer_depth_output=(0, 0, 0, *[1] * 6)
    )
    return harness.make_sdxl_unet(**SDXL_WIDTHS, **one_each)


def planted_masks(x, family: str, n_subjects: int) -> SubjectMasks:
    """Vertical stripes, one per subject, on the call's token grid (FLUX) or latent grid (SDXL)."""
    h, w = ((x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2) if family == "flux" else tuple(x.shape[-2:])
    planes = torch.zeros(x.shape[0], n_subjects, h, w)
    for c in range(n_subjects):
        planes[:, c, :, c * w // n_subjects : (c + 1) * w // n_subjects] = 1
    return SubjectMasks(masks=planes, background=torch.zeros(x.shape[0], h, w))


def variant_runner(harness, family: str, loras: list, bias: str | None, style=None, selector: str = "kl"):
    """before_sampling that installs FreeFuse with planted masks for ``loras`` (bias None, "dense", "channels"),
    and ``style`` fused by ``selector`` when given."""

    def before(unet, sigmas, x, cond, uncond):
        settings = FreeFuseSettings.defaults(family).replace(
            enabled=True, capture_block=0, attention_bias=bias is not None, style_selector=selector
        )
        subjects = [SubjectSpec(lora.name, lora.filename, lora.name, [1 + 2 * i]) for i, lora in enumerate(loras)]
        styles = [SubjectSpec(style.name, style.filename, "", [])] if style is not None else []
        plan = Plan(
            settings, subjects, None, FAMILIES[family]["n_txt"], sigmas, masks=planted_masks(x, family, len(loras)),
            styles=styles,
        )  # fmt: skip
        session = Session(plan)
        if bias is not None:
            session.bias.form = bias
        patched = session.install(unet)
        assert patched is not unet, session.messages
        return patched

    return before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["flux", "sdxl", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--style-only", action="store_true",
        help="only plain, merged, FreeFuse 2 x r16 and the style variants (the cost of style fusion)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    families = ["flux", "sdxl"] if args.family == "both" else [args.family]
    with harness_context() as (harness, backend), torch.inference_mode():
        print(f"backend: {backend}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
        for family in families:
            run_family(harness, family, args.rounds, args.style_only)


def run_family(harness, family: str, rounds: int, style_only: bool = False) -> None:
    spec = FAMILIES[family]
    unet = build(harness, family)
    loras = {
        (i, r): harness.make_lora(unet, name=f"S{i}r{r}", rank=r, seed=10 * i + r) for r in (16, 64) for i in range(4)
    }

    def subjects(count, rank):
        return [loras[(i, rank)] for i in range(count)]

    merged = harness.add_loras(unet, [(lora, 1.0) for lora in subjects(2, 16)])
    variants = {"plain": (unet, None), "merged": (merged, None)}
    for count, rank in ((2, 16),) if style_only else ((2, 16), (4, 16), (2, 64), (4, 64)):
        both = harness.add_loras(unet, [(lora, 1.0) for lora in subjects(count, rank)])
        variants[f"FreeFuse {count} x r{rank}"] = (both, variant_runner(harness, family, subjects(count, rank), None))
    two = harness.add_loras(unet, [(lora, 1.0) for lora in subjects(2, 16)])
    for form in () if style_only else ("dense", "channels"):
        variants[f"FreeFuse 2 x r16 + bias {form}"] = (two, variant_runner(harness, family, subjects(2, 16), form))
    style = harness.make_lora(unet, name="style", rank=16, seed=99)
    styled = harness.add_loras(unet, [(lora, 1.0) for lora in [*subjects(2, 16), style]])
    variants["merged + style"] = (styled, None)
    for selector in ("sum", "kl", "klora"):
        runner = variant_runner(harness, family, subjects(2, 16), None, style, selector)
        variants[f"FreeFuse 2 x r16 + style {selector}"] = (styled, runner)

    results = {name: {block: [] for block in spec["blocks"]} for name in variants}
    peaks = {name: {block: 0 for block in spec["blocks"]} for name in variants}
    for round_index in range(rounds + 1):
        for name, (model, before) in variants.items():
            timer = BlockTimer(unet.model.diffusion_model, spec["blocks"])
            try:
                harness.sample(
                    model, steps=1, height=spec["size"], width=spec["size"], n_txt=spec["n_txt"], cfg=spec["cfg"],
                    seed=1, before_sampling=before,
                )  # fmt: skip
            finally:
                timer.remove()
                sessions.close_active()
            if round_index:  # the first round warms up
                for block in spec["blocks"]:
                    results[name][block].append(timer.seconds[block])
                    peaks[name][block] = max(peaks[name][block], timer.peak[block])
    report(family, spec, results, peaks, rounds)


def report(family, spec, results, peaks, rounds) -> None:
    print(
        f"\n{family}: {spec['size']}x{spec['size']}, {spec['n_txt']} text tokens"
        f"{', CFG (2 rows)' if spec['cfg'] != 1.0 else ''}; median of {rounds} rounds"
    )
    for block in spec["blocks"]:
        base = statistics.median(results["merged"][block])
        freefuse = statistics.median(results["FreeFuse 2 x r16"][block])
        print(f"  {block}")
        print(f"    {'variant':32s} {'seconds':>9s} {'vs merged':>10s} {'vs FreeFuse':>12s} {'peak memory':>12s}")
        for name in results:
            seconds = statistics.median(results[name][block])
            versus = f"{seconds / freefuse:11.3f}x" if "style" in name and "FreeFuse" in name else " " * 12
            print(f"    {name:32s} {seconds:9.3f} {seconds / base:9.3f}x {versus} {mib(peaks[name][block]):>12s}")


if __name__ == "__main__":
    main()
