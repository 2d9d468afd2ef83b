"""FreeFuse in Forge's FLUX: time per sampling step with the subject LoRAs as masked runtime deltas, against
the same LoRAs merged into the weights, and the restart schedule's extra model evaluations.

Uses the real Forge backend when FORGE_DIR points at a Forge checkout (the stand-in otherwise, said in the
output). The model is a random-weight FLUX with the real 19 double / 38 single block layout at a small width.

    FORGE_DIR=/path/to/forge python3 benchmarks/bench_forge_flux.py [--quick] [--hidden 256 --heads 4]
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


def run(harness, unet, loras, *, freefuse: str | None, steps: int, size: int, counter: Counter):
    """Sample once; freefuse None (merged), "masked" (masks from step 0) or "restart" (full schedule)."""
    handle = unet.model.diffusion_model.register_forward_pre_hook(counter, with_kwargs=True)

    def before(unet_, sigmas, x, cond, uncond):
        settings = FreeFuseSettings.defaults("flux").replace(enabled=True, schedule="restart")
        masks = None
        if freefuse == "masked":
            from freefuse.partition import SubjectMasks

            h, w = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
            planes = torch.zeros(x.shape[0], 2, h, w)
            planes[:, 0, :, : w // 2] = 1
            planes[:, 1, :, w // 2 :] = 1
            masks = SubjectMasks(masks=planes, background=torch.zeros(x.shape[0], h, w))
        n_txt = 16
        plan = Plan(
            settings,
            [SubjectSpec(n, loras[n].filename, n, p) for n, p in (("A", [1, 2]), ("B", [4, 5]))],
            None,
            n_txt,
            sigmas,
            x.shape[0],
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
            n_txt=16,
            seed=1,
            before_sampling=before if freefuse else None,
        )
        return time.perf_counter() - start
    finally:
        handle.remove()
        sessions.close_active()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller image")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    size = 128 if args.quick else args.size
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    with harness_context() as (harness, backend):
        base = harness.make_flux_unet(n_double=19, n_single=38, hidden=args.hidden, heads=args.heads, context_dim=64)
        loras = {n: harness.make_lora(base, name=n, rank=args.rank, seed=i + 1) for i, n in enumerate("AB")}
        both = harness.add_loras(base, [(loras["A"], 1.0), (loras["B"], 1.0)])
        results = {}
        for label, mode in (
            ("merged (plain Forge)", None),
            ("FreeFuse masked", "masked"),
            ("FreeFuse restart", "restart"),
        ):
            counter = Counter()
            run(harness, both, loras, freefuse=mode, steps=args.steps, size=size, counter=Counter())  # warm-up
            times = [
                run(harness, both, loras, freefuse=mode, steps=args.steps, size=size, counter=counter)
                for _ in range(repeats)
            ]
            results[label] = (statistics.median(times), counter.calls // repeats)

    tokens = (size // 16) ** 2
    print(f"backend: {backend}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(
        f"model: 19 double / 38 single blocks, hidden {args.hidden}, {args.heads} heads; 2 subject LoRAs rank "
        f"{args.rank} on every block Linear; {size}x{size} px ({tokens} image tokens), {args.steps} steps, "
        f"median of {repeats}"
    )
    merged_time, merged_calls = results["merged (plain Forge)"]
    print(f"{'run':24s} {'s/step':>9s} {'model evals':>12s} {'time vs merged':>15s}")
    for label, (seconds, calls) in results.items():
        print(f"{label:24s} {seconds / args.steps:9.4f} {calls:12d} {seconds / merged_time:14.2f}x")
    masked = results["FreeFuse masked"][0]
    restart_time, restart_calls = results["FreeFuse restart"]
    print(
        f"per-step cost of runtime masked LoRAs: {masked / merged_time:.2f}x merged; restart schedule: "
        f"{restart_calls - merged_calls} extra model evaluations ({restart_calls / merged_calls:.2f}x), "
        f"{restart_time / merged_time:.2f}x the merged wall time"
    )


if __name__ == "__main__":
    main()
