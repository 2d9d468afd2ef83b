"""Installs the stand-in `backend` package for a limited time, without shadowing a real Forge.

The stand-in lives in fake_forge/backend and has the same top-level name as Forge's `backend`. Both
tiers (this one and tests/forge, which imports a real checkout) may run in one pytest process, so the
stand-in is never left on sys.path or in sys.modules: `standin_forge()` sets aside whatever `backend*`
modules are loaded, puts the stand-in's modules (cached after the first import, so the same module
objects every time) in their place with fake_forge at the front of sys.path, and on exit removes them
and restores what it set aside. Code under test must therefore look Forge up at call time
(`import backend.nn.flux` inside a function, or the harness's `flux_module`), not bind it at import.
"""

import contextlib
import importlib
import sys
from pathlib import Path

FAKE_FORGE = Path(__file__).resolve().parent / "fake_forge"
PACKAGE = "backend"
_MODULES = (
    "backend.utils",
    "backend.attention",
    "backend.operations",
    "backend.memory_management",
    "backend.nn.flux",
    "backend.nn.unet_blocks",
    "backend.nn.unet",
    "backend.nn.unet_model",
    "backend.modules.k_model",
    "backend.modules.k_prediction",
    "backend.patcher.lora",
    "backend.patcher.base",
    "backend.patcher.unet",
    "backend.sampling.condition",
    "backend.sampling.sampling_function",
)
_cache: dict = {}


def _is_backend(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _take_backend_modules() -> dict:
    taken = {name: module for name, module in sys.modules.items() if _is_backend(name)}
    for name in taken:
        del sys.modules[name]
    return taken


def is_standin_module(module) -> bool:
    path = getattr(module, "__file__", None)
    return path is not None and Path(path).resolve().is_relative_to(FAKE_FORGE)


@contextlib.contextmanager
def standin_forge():
    """Inside the block `import backend` gives the stand-in; afterwards sys.modules/sys.path are restored."""
    set_aside = _take_backend_modules()
    sys.modules.update(_cache)
    sys.path.insert(0, str(FAKE_FORGE))
    importlib.invalidate_caches()
    try:
        for name in _MODULES:
            importlib.import_module(name)
        yield
    finally:
        sys.path.remove(str(FAKE_FORGE))
        ours = _take_backend_modules()
        _cache.update({name: module for name, module in ours.items() if is_standin_module(module)})
        sys.modules.update(set_aside)
