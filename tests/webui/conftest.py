"""Webui tier: a real Forge process (a patched test copy, tiny random models) driven over HTTP.

Runs when FORGE_DIR points at a Forge checkout and FORGE_PYTHON at a Python with Forge's requirements;
skipped (with the reason) otherwise. See README.md.

Fixtures (session scope: one copy, one server):
- `webui_forge`  Path of the test copy of Forge (its models/ and extensions/ hold what the tests use).
- `webui_server` the running ForgeServer (url, port, log_path, startup_seconds, log_tail()).
- `webui`        a WebuiClient on it (txt2img, img2img, png_info, select_model, set_options, ...).
- `server_log`   call it to read what the server logged since the test started.
Names and request bodies: payloads.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

FORGE_DIR = os.environ.get("FORGE_DIR", "").strip()
FORGE_PYTHON = os.environ.get("FORGE_PYTHON", "").strip()
HERE = Path(__file__).resolve().parent
PROBE = (
    "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'gradio', 'safetensors')))"
)


def _skip_reason() -> str | None:
    if not FORGE_DIR:
        return "FORGE_DIR is not set: the webui tier needs a Forge checkout (FORGE_DIR=/path/to/forge)"
    if not (Path(FORGE_DIR) / "launch.py").is_file():
        return f"FORGE_DIR={FORGE_DIR} has no launch.py: not a Forge checkout"
    if not FORGE_PYTHON:
        return "FORGE_PYTHON is not set: the webui tier needs a Python with Forge's requirements"
    python = shutil.which(FORGE_PYTHON) or FORGE_PYTHON
    try:
        subprocess.run([python, "-c", PROBE], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return f"FORGE_PYTHON={FORGE_PYTHON} is not runnable or lacks torch, gradio or safetensors: {error}"
    return None


_REASON: list[str | None] = []


def skip_reason() -> str | None:
    if not _REASON:
        _REASON.append(_skip_reason())
    return _REASON[0]


def pytest_collection_modifyitems(config, items):
    """Skip every test of this directory when there is no Forge (or no Forge Python) to run."""
    mine = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    if not mine or skip_reason() is None:
        return
    skip = pytest.mark.skip(reason=skip_reason())
    for item in mine:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def webui_forge() -> Path:
    """The test copy of Forge (built once, cached; see forge_copy.py), the extension under test linked in."""
    if skip_reason():
        pytest.skip(skip_reason())
    from tests.webui.forge_copy import link_extension_under_test, prepared_forge

    guess = os.environ.get("HUGGINGFACE_GUESS_DIR", "").strip()
    forge = prepared_forge(Path(FORGE_DIR), shutil.which(FORGE_PYTHON) or FORGE_PYTHON, Path(guess) if guess else None)
    extension = os.environ.get("FREEFUSE_WEBUI_EXTENSION", "").strip()  # another tree of the extension to test
    link_extension_under_test(forge, Path(extension) if extension else None)
    return forge


@pytest.fixture(scope="session")
def webui_server(webui_forge):
    """A running Forge (API + UI) on a free loopback port; stopped at the end of the session. Its log stays at
    <cache>/runs/<time>-<pid>/forge.log (the last five runs are kept)."""
    from tests.webui.server import ForgeServer

    runs = webui_forge.parent / "runs"
    for old in sorted(runs.glob("*"))[:-4] if runs.is_dir() else []:
        shutil.rmtree(old, ignore_errors=True)
    run_dir = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    server = ForgeServer(webui_forge, shutil.which(FORGE_PYTHON) or FORGE_PYTHON, run_dir)
    server.start()
    print(f"\nForge up in {server.startup_seconds:.0f} s at {server.url}; log {server.log_path}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def webui(webui_server):
    from tests.webui.client import WebuiClient

    return WebuiClient(webui_server.url)


@pytest.fixture
def server_log(webui_server):
    """Call to get the server log written since this fixture was set up (for asserting on Forge's console)."""
    start = webui_server.log_path.stat().st_size

    def read() -> str:
        with open(webui_server.log_path, encoding="utf-8", errors="replace") as log:
            log.seek(start)
            return log.read()

    return read
