"""Self-tests of the stand-in harness's FLUX side: the shared ones (tests/forge_common/harness_selftests.py)
and the stand-in's own: it is installed for this directory only and leaves sys.modules as it found them."""

import sys
import types

from tests.forge_common.harness_selftests import *  # noqa: F403 - the shared self-tests


def test_backend_is_the_stand_in_during_these_tests(harness):
    from .standin_modules import is_standin_module

    assert is_standin_module(harness.flux_module)
    assert sys.modules["backend.nn.flux"] is harness.flux_module


def test_standin_forge_sets_other_backend_modules_aside_and_restores_them():
    from .standin_modules import is_standin_module, standin_forge

    installed = {n: m for n, m in sys.modules.items() if n == "backend" or n.startswith("backend.")}
    for name in installed:
        del sys.modules[name]
    foreign = types.ModuleType("backend")
    sys.modules["backend"] = foreign
    path_before = list(sys.path)
    try:
        with standin_forge():
            import backend.nn.flux as flux

            assert is_standin_module(flux)
            assert sys.modules["backend"] is not foreign
        assert sys.modules["backend"] is foreign
        assert "backend.nn.flux" not in sys.modules
        assert sys.path == path_before
    finally:
        sys.modules.pop("backend", None)
        sys.modules.update(installed)
