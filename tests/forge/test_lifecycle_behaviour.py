"""FreeFuse sessions across Forge workflows, real Forge backend (see tests/forge_common/lifecycle_behaviour.py)."""

from tests.forge_common.lifecycle_behaviour import *  # noqa: F403 - the shared behaviour tests
