"""The FreeFuse script driven like Forge does, on the stand-in backend (see tests/forge_common/)."""

from tests.forge_common.script_behaviour import *  # noqa: F403 - the shared behaviour tests
