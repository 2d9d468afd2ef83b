"""The attention bias in both forms on the stand-in of Forge (see tests/forge_common/bias_forms_behaviour.py)."""

from tests.forge_common.bias_forms_behaviour import *  # noqa: F403 - the shared behaviour tests
