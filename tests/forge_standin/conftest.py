"""Stand-in tier fixtures.

`_standin_backend` (autouse, module scope) installs the stand-in `backend` package while the tests of
one module of this directory run and restores sys.modules / sys.path after that module (see
standin_modules.py), so the real-Forge tier in tests/forge is never shadowed, even in the same pytest
process (pytest runs a module's tests together). `harness` is module-scoped for the same reason, so
fixtures of module or function scope may build on it. Nothing here
imports `backend` at collection time. The tests run torch on one thread (restored afterwards): the
shapes are tiny, and several OpenMP threads on a busy 2-core runner make each op ~100x slower.
"""

import pytest
import torch

from .standin_modules import standin_forge


@pytest.fixture(scope="module", autouse=True)
def _standin_backend():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with standin_forge():
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def harness(_standin_backend):
    from .harness import StandinHarness

    return StandinHarness()
