"""The pure core never imports Forge, the webui or gradio (only freefuse/forge and scripts/ may)."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "freefuse"
FORBIDDEN = {"modules", "modules_forge", "backend", "networks", "network", "launch", "gradio", "ldm_patched"}


def core_files():
    return [p for p in CORE.rglob("*.py") if "forge" not in p.relative_to(CORE).parts]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_sources_import_nothing_from_forge():
    offenders = {p.name: sorted(imported_roots(p) & FORBIDDEN) for p in core_files()}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(core_files()) >= 8


def test_every_core_module_imports_in_a_clean_interpreter():
    modules = [f"freefuse.{p.stem}" for p in core_files() if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(set(k.split('.')[0] for k in sys.modules) & {FORBIDDEN!r})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CORE.parent)
