"""Shared test configuration: deterministic torch on one thread, the repo root on sys.path.

One thread: on a 2-core CI machine tiny tensor ops are far slower with two threads contending.
"""

import sys
from pathlib import Path

import pytest

# the shared behaviour and harness modules hold asserts too: show their values when they fail
pytest.register_assert_rewrite("tests.forge_common")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
