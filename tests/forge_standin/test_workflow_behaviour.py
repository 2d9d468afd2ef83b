"""The FreeFuse script in Forge workflows on the stand-in of Forge (see tests/forge_common/workflow_behaviour.py)."""

from tests.forge_common.workflow_behaviour import *  # noqa: F403 - the shared behaviour tests
