"""Self-tests of the real-Forge harness's FLUX side: the shared ones (tests/forge_common/harness_selftests.py)
and the real tier's own: the backend is the checkout's, and the model's layers are Forge's operations."""

import sys
from pathlib import Path

from tests.forge_common.harness_selftests import *  # noqa: F403 - the shared self-tests


def test_backend_is_the_checkouts_own_and_builds_with_its_operations(harness):
    flux = harness.flux_module
    assert Path(flux.__file__).resolve().is_relative_to(harness.forge.root)
    assert sys.modules["backend.nn.flux"] is flux
    dm = harness.make_flux_unet().model.diffusion_model
    assert type(dm.double_blocks[0].img_attn.qkv) is harness.forge.operations.ForgeOperations.Linear
