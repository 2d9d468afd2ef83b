"""FreeFuse in Forge: time per sampling step with the subject LoRAs as masked runtime deltas, against the
same LoRAs merged into the weights, and the restart schedule's extra model evaluations; FLUX and SDXL.

Uses the real Forge backend when FORGE_DIR points at a Forge checkout (the stand-in otherwise, said in the
output). Models are random-weight, with the real block layout at a small width: FLUX 19 double / 38 single
blocks; SDXL's UNet with transformer depths 2/10 and a 10-deep middle block.

    FORGE_DIR=/path/to/forge python3 benchmarks/bench_forge.py [--quick] [--family flux|sdxl|both]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from freefuse.forge import session as sessions  # noqa: E402
from freefuse.forge.session import Plan, Session, SubjectSpec  # noqa: E402
from freefuse.settings import FreeFuseSettings  # noqa: E402


@contextlib.contextmanager
def harness_context():
    forge_dir = os.environ.get("FORGE_DIR", "").strip()
    if forge_dir:
        from tests.forge.harness import ForgeHarness

        yield ForgeHarness(forge_dir), f"real Forge backend ({forge_dir})"
        return
    from tests.forge_standin.harness import StandinHarness
    from tests.forge_standin.standin_modules import standin_forge

    with standin_forge():
        yield StandinHarness(), "stand-in backend (FORGE_DIR unset)"


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, module, args, kwargs):
        self.calls += 1


def run(harness, unet, loras, *, family: str, freefuse: str | None, steps: int, size: int, counter: Counter):
    """Sample once; freefuse None (merged), "masked" (masks from step 0) or "restart" (full schedule)."""
    handle = unet.model.diffusion_model.register_forward_pre_hook(counter, with_kwargs=True)
    n_txt = 16 if family == "flux" else 77
    cfg = 1.0 if family == "flux" else 5.0

    def before(unet_, sigmas, x, cond, uncond):
        settings = FreeFuseSettings.defaults(family).replace(enabled=True, schedule="restart")
        masks = None
        if freefuse == "masked":
            from freefuse.partition import SubjectMasks

            h, w = ((x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2) if family == "flux" else tuple(x.shape[-2:])
            planes = torch.zeros(x.shape[0], 2, h, w)
            planes[:, 0, :, : w // 2] = 1
            planes[:, 1, :, w // 2 :] = 1
            masks = SubjectMasks(masks=planes, background=torch.zeros(x.shape[0], h, w))
        plan = Plan(
            settings,
            [SubjectSpec(n, loras[n].filename, n, p) for n, p in (("A", [1, 2]), ("B", [4, 5]))],
            None,
            n_txt,
            sigmas,
            masks=masks,
        )
        session = Session(plan)
        patched = session.install(unet_)
        assert patched is not unet_, session.messages
        return patched

    try:
        start = time.perf_counter()
        harness.sample(
            unet,
            steps=steps,
            height=size,
            width=size,
            n_txt=n_txt,
            cfg=cfg,
            seed=1,
            before_sampling=before if freefuse else None,
        )
        return time.perf_counter() - start
    finally:
        handle.remove()
        sessions.close_active()


def build(harness, family: str, args):
    if family == "flux":
        unet = harness.make_flux_unet(n_double=19, n_single=38, hidden=args.hidden, heads=args.heads, context_dim=64)
        label = f"FLUX 19 double / 38 single blocks, hidden {args.hidden}, {args.heads} heads"
    else:
        unet = harness.make_sdxl_unet(
            model_channels=args.hidden // 4,
            transformer_depth=(0, 0, 2, 2, 10, 10),
            transformer_depth_middle=10,
            transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10),
            num_head_channels=16,
            context_dim=64,
        )
        label = f"SDXL UNet (depths 2/10, middle 10), {args.hidden // 4} base channels"
    loras = {n: harness.make_lora(unet, name=n, rank=args.rank, seed=i + 1) for i, n in enumerate("AB")}
    return unet, loras, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller image")
    parser.add_argument("--family", choices=["flux", "sdxl", "both"], default="both")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="at least 10 (SDXL captures at step index 9)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    size = 128 if args.quick else args.size
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    families = ["flux", "sdxl"] if args.family == "both" else [args.family]

    with harness_context() as (harness, backend):
        print(f"backend: {backend}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
        for family in families:
            base, loras, label = build(harness, family, args)
            both = harness.add_loras(base, [(loras["A"], 1.0), (loras["B"], 1.0)])
            results = {}
            for name, mode in (
                ("merged (plain Forge)", None),
                ("FreeFuse masked", "masked"),
                ("FreeFuse restart", "restart"),
            ):
                counter = Counter()
                kw = dict(family=family, freefuse=mode, steps=args.steps, size=size)
                run(harness, both, loras, counter=Counter(), **kw)  # warm-up
                times = [run(harness, both, loras, counter=counter, **kw) for _ in range(repeats)]
                results[name] = (statistics.median(times), counter.calls // repeats)
            report(family, label, results, args, size, repeats)


def report(family, label, results, args, size, repeats) -> None:
    print(
        f"\n{family}: {label}; 2 subject LoRAs rank {args.rank} on every block layer; {size}x{size} px, "
        f"{args.steps} steps{', CFG 5' if family == 'sdxl' else ''}, median of {repeats}"
    )
    merged_time, merged_calls = results["merged (plain Forge)"]
    print(f"{'run':24s} {'s/step':>9s} {'model evals':>12s} {'time vs merged':>15s}")
    for name, (seconds, calls) in results.items():
        print(f"{name:24s} {seconds / args.steps:9.4f} {calls:12d} {seconds / merged_time:14.2f}x")
    masked = results["FreeFuse masked"][0]
    restart_time, restart_calls = results["FreeFuse restart"]
    print(
        f"per-step cost of runtime masked LoRAs: {masked / merged_time:.2f}x merged; restart schedule: "
        f"{restart_calls - merged_calls} extra model evaluations ({restart_calls / merged_calls:.2f}x), "
        f"{restart_time / merged_time:.2f}x the merged wall time"
    )


if __name__ == "__main__":
    main()
