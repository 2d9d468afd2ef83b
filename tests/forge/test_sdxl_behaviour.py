"""FreeFuse on an SDXL-layout UNet, against this tier's backend (see tests/forge_common/sdxl_behaviour.py)."""

from tests.forge_common.sdxl_behaviour import *  # noqa: F403 - the shared behaviour tests
