"""Real-Forge tier: runs when FORGE_DIR points at a Forge checkout, is skipped (with the reason) otherwise.

Run: FORGE_DIR=/path/to/stable-diffusion-webui-forge python3 -m pytest tests/forge -q
"""

import os
from pathlib import Path

import pytest

FORGE_DIR = os.environ.get("FORGE_DIR", "").strip()
SKIP_REASON = "FORGE_DIR is not set: the real-Forge tier needs a Forge checkout (FORGE_DIR=/path/to/forge)"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Skip every test of this directory when there is no Forge checkout to test against."""
    if FORGE_DIR:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def harness():
    """The real-Forge harness (tests/forge/harness.py); Forge's backend is imported once per session."""
    if not FORGE_DIR:
        pytest.skip(SKIP_REASON)
    from tests.forge.harness import ForgeHarness

    return ForgeHarness(FORGE_DIR)
