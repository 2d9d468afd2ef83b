"""The live subject preview on the real Forge backend (see tests/forge_common/preview_behaviour.py)."""

from tests.forge_common.preview_behaviour import *  # noqa: F403 - the shared behaviour tests
