"""The GPU benchmark script runs end to end (with --tiny on the CPU) and refuses clearly without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"


def _run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def test_the_gpu_benchmark_stops_with_a_message_without_cuda():
    if torch.cuda.is_available():
        return
    result = _run("--family", "flux")
    assert result.returncode != 0 and "needs a CUDA GPU" in result.stderr and "--tiny" in result.stderr


def test_the_gpu_benchmark_runs_its_whole_table_on_tiny_models():
    result = _run("--tiny", "--family", "flux")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for row in ("merged", "continue, bias channels", "continue, bias dense", "restart, bias channels"):
        assert f"  {row} " in out
    assert "(+5)" in out  # restart's extra model evaluations (capture_step 4 + 1)
    assert "official masks" in out and "paper masks" in out


def test_the_refinement_benchmark_runs_its_whole_table_on_tiny_models():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_refine.py"), "--tiny", "--rounds", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for family in ("FLUX", "SDXL"):
        assert f"{family} toy latent, one guided step" in result.stdout
    for row in ("VAE decode 512px", "decode fwd+bwd", "CLIP-H fwd+bwd", "DINOv2-B fwd+bwd x2", "refinement step"):
        assert result.stdout.count(f"{row} ") == 2, result.stdout
