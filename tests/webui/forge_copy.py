"""The test copy of Forge: made once, cached on disk under a hash of its inputs, never inside the repo.

A copy is FORGE_DIR without .git, models, outputs, extensions and settings, plus huggingface_guess (from
FORGE_DIR/repositories/huggingface_guess or HUGGINGFACE_GUESS_DIR), an empty stable-diffusion-webui-assets
folder (the UI mounts it), the patches of forge_patches.py, the test failure extension and the tiny models
(build_models.py, run in FORGE_PYTHON). The extension under test is linked in at server start
(`link_extension_under_test`), so the working tree is what is tested and the cache does not depend on it.

Cache: $FREEFUSE_WEBUI_CACHE or ~/.cache/freefuse-webui, one folder per input hash (file sizes and mtimes
of the Forge and huggingface_guess trees, the builder sources, the Python); older copies are removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.webui.forge_patches import apply_patches

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
EXTENSION_NAME = "sd-forge-freefuse"
FAILURE_EXTENSION = HERE / "failure_extension"
FAILURE_EXTENSION_NAME = "freefuse-test-failure"
BUILDER_SOURCES = [  # what a copy is made from (not the tests, client or server)
    *(HERE / name for name in ("sizes.py", "forge_patches.py", "forge_copy.py", "build_models.py")),
    *sorted(HERE.glob("tiny_*.py")),
    *sorted(FAILURE_EXTENSION.rglob("*.py")),
    REPO_ROOT / "tests" / "forge_common" / "harness_conventions.py",
    REPO_ROOT / "tests" / "tiny" / "encoders.py",
]
SKIPPED = {
    ".git",
    "repositories",
    "models",
    "outputs",
    "extensions",
    "venv",
    "__pycache__",
    "log",
    "config.json",
    "ui-config.json",
    "cache.json",
    "params.txt",
    "styles.csv",
}
ALWAYS_SKIPPED = {".git", "__pycache__"}
MODEL_FOLDERS = ["Stable-diffusion", "Lora", "VAE", "text_encoder", "VAE-approx"]


def cache_root() -> Path:
    return Path(os.environ.get("FREEFUSE_WEBUI_CACHE") or Path.home() / ".cache" / "freefuse-webui")


def _tree_stats(root: Path, digest) -> None:
    """Feed every file's path, size and mtime (not contents: 60 MB) to `digest`, skipping what the copy skips."""
    for dirpath, dirnames, filenames in os.walk(root):
        top = Path(dirpath) == root
        dirnames[:] = sorted(d for d in dirnames if d not in ALWAYS_SKIPPED and not (top and d in SKIPPED))
        for name in sorted(filenames):
            if (top and name in SKIPPED) or name.endswith(".pyc"):
                continue
            path = os.path.join(dirpath, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())


def input_hash(forge_dir: Path, guess_dir: Path, forge_python: str) -> str:
    digest = hashlib.sha256(forge_python.encode())
    _tree_stats(forge_dir, digest)
    _tree_stats(guess_dir, digest)
    for source in BUILDER_SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _ignore_top_level(root: Path):
    def ignore(directory: str, names: list[str]) -> set[str]:
        if Path(directory) == root:
            return {n for n in names if n in SKIPPED}
        return {n for n in names if n in ALWAYS_SKIPPED}

    return ignore


def _pycache(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in ALWAYS_SKIPPED}


def _build(forge_dir: Path, guess_dir: Path, forge_python: str, target: Path) -> None:
    shutil.copytree(forge_dir, target, symlinks=True, ignore=_ignore_top_level(forge_dir))
    shutil.copytree(guess_dir, target / "repositories" / "huggingface_guess", ignore=shutil.ignore_patterns(".git"))
    (target / "repositories" / "stable-diffusion-webui-assets").mkdir()
    for folder in MODEL_FOLDERS:
        (target / "models" / folder).mkdir(parents=True, exist_ok=True)
    (target / "extensions").mkdir()
    shutil.copytree(FAILURE_EXTENSION, target / "extensions" / FAILURE_EXTENSION_NAME, ignore=_pycache)
    done = apply_patches(target)
    (target / "FREEFUSE_TEST_PATCHES.txt").write_text("\n".join(done) + "\n", encoding="utf-8")
    log = target / "build_models.log"
    with open(log, "w", encoding="utf-8") as out:
        result = subprocess.run(
            [forge_python, "-m", "tests.webui.build_models", str(target)],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            check=False,
        )
    if result.returncode != 0:
        kept = cache_root() / "build_models-failed.log"  # the half-built copy is removed
        shutil.copyfile(log, kept)
        tail = kept.read_text(encoding="utf-8", errors="replace")[-6000:]
        raise RuntimeError(f"building the tiny models failed (exit {result.returncode}); {kept}:\n{tail}")


def prepared_forge(forge_dir: Path, forge_python: str, guess_dir: Path | None = None) -> Path:
    """The path of a ready test copy of Forge for these inputs, built now if the cache has none."""
    forge_dir = forge_dir.resolve()
    guess_dir = (guess_dir or forge_dir / "repositories" / "huggingface_guess").resolve()
    if not (guess_dir / "huggingface_guess" / "detection.py").is_file():
        raise FileNotFoundError(f"no huggingface_guess checkout at {guess_dir} (set HUGGINGFACE_GUESS_DIR)")
    root = cache_root()
    final = root / f"forge-{input_hash(forge_dir, guess_dir, forge_python)}"
    if (final / ".complete").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    building = root / f"{final.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    started = time.monotonic()
    try:
        _build(forge_dir, guess_dir, forge_python, building)
        (building / ".complete").write_text(f"built in {time.monotonic() - started:.0f} s\n", encoding="utf-8")
        if final.exists():  # a broken or concurrent build: keep one
            shutil.rmtree(final, ignore_errors=True)
        building.rename(final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    for old in root.glob("forge-*"):  # older copies, and builds a killed session left behind
        if old != final and (".building-" not in old.name or time.time() - old.stat().st_mtime > 3600):
            shutil.rmtree(old, ignore_errors=True)
    return final


def link_extension_under_test(forge: Path, source: Path | None = None) -> Path:
    """extensions/sd-forge-freefuse -> `source` (default: this repository's working tree), replacing a link
    that points elsewhere."""
    source = (source or REPO_ROOT).resolve()
    link = forge / "extensions" / EXTENSION_NAME
    if link.is_symlink() and link.resolve() == source:
        return link
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(source, target_is_directory=True)
    return link
