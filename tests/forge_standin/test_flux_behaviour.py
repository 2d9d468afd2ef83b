"""FreeFuse's FLUX behaviour against the stand-in of Forge (see tests/forge_common/flux_behaviour.py)."""

from tests.forge_common.flux_behaviour import *  # noqa: F403 - the shared behaviour tests
