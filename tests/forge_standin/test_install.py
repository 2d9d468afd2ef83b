"""install.py, as Forge runs it at start-up: install what is missing with Forge's pip helper, else nothing."""

import runpy
import sys
import types
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[2] / "install.py"


@pytest.fixture
def launch(monkeypatch):
    fake = types.SimpleNamespace(installed=set(), pip_calls=[])
    fake.is_installed = lambda name: name in fake.installed
    fake.run_pip = lambda command, desc=None: fake.pip_calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", fake)
    return fake


def test_nothing_is_installed_when_everything_is_there(launch):
    launch.installed = {"skimage"}
    runpy.run_path(str(INSTALL))
    assert launch.pip_calls == []


def test_a_missing_requirement_is_installed_with_forges_pip(launch):
    runpy.run_path(str(INSTALL))
    assert launch.pip_calls == ["install scikit-image>=0.21"]


def test_install_covers_every_runtime_requirement(launch):
    listed = [line.strip() for line in (INSTALL.parent / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in listed if line and not line.startswith("#")]
    runpy.run_path(str(INSTALL))
    assert sorted(c.removeprefix("install ") for c in launch.pip_calls) == sorted(requirements)
