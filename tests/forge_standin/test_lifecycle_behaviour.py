"""FreeFuse sessions across Forge workflows on the stand-in of Forge (see tests/forge_common/lifecycle_behaviour.py)."""

from tests.forge_common.lifecycle_behaviour import *  # noqa: F403 - the shared behaviour tests
