"""Masks the user gives, hints, locks and exports, on the stand-in backend (see tests/forge_common/)."""

from tests.forge_common.layout_behaviour import *  # noqa: F403 - the shared behaviour tests
