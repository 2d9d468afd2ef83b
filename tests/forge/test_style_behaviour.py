"""Subject + style fusion on the real Forge backend (see tests/forge_common/)."""

from tests.forge_common.style_behaviour import *  # noqa: F403 - the shared behaviour tests
