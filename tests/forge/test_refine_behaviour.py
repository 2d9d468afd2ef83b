"""Latent refinement on the real Forge backend (see tests/forge_common/)."""

from tests.forge_common.refine_behaviour import *  # noqa: F403 - the shared behaviour tests
