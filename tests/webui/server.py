"""One Forge process (launch.py of the test copy) on a free loopback port: started, waited for, stopped.

Headless, CPU-only, offline (docs: forge-internals.md section 8): no prepare-environment (no pip, no git,
no extension installers), no model download, no hashing, no NaN check, text encoders in fp32, Hugging Face
offline, every proxy variable pointing at a dead local port (loopback exempt), settings and UI layout in
a fresh per-session file (live previews off: the SDXL preview decoder would be downloaded). `--api` with
the UI built: only then does Forge list the separate VAE / text-encoder files (forge_additional_modules)
a GGUF checkpoint needs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

FLAGS = [
    "--always-cpu",
    "--skip-prepare-environment",
    "--skip-install",
    "--skip-torch-cuda-test",
    "--skip-version-check",
    "--no-download-sd-model",
    "--no-hashing",
    "--disable-nan-check",
    "--clip-in-fp32",
    "--api",
]
INITIAL_OPTIONS = {
    "sd_model_checkpoint": "flux_a.safetensors",
    "live_previews_enable": False,
    "show_progress_every_n_steps": -1,
    "samples_save": False,
    "grid_save": False,
    "save_images_before_face_restoration": False,
    "auto_backcompat": True,
}
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "COMMANDLINE_ARGS": "",
}
STARTUP_CRASH = "Exception in thread"  # webui.py's worker thread died; the process lives on without an API
READY_PATHS = ["/sdapi/v1/sd-models", "/sdapi/v1/loras"]
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens
PROXY_VARS = ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ForgeServer:
    """`start()` launches and waits until the API answers (READY_PATHS); `stop()` ends the process group."""

    def __init__(self, forge: Path, python: str, run_dir: Path, extra_args: list[str] | None = None):
        self.forge, self.python, self.run_dir = forge, python, run_dir
        self.extra_args = list(extra_args or [])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = run_dir / "forge.log"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def log_tail(self, chars: int = 8000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self, timeout: float = 300.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        settings = self.run_dir / "config.json"
        settings.write_text(json.dumps(INITIAL_OPTIONS, indent=2), encoding="utf-8")
        args = [
            self.python,
            "launch.py",
            *FLAGS,
            "--port",
            str(self.port),
            "--ui-settings-file",
            str(settings),
            "--ui-config-file",
            str(self.run_dir / "ui-config.json"),
            *self.extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        env.update(OFFLINE_ENV)
        env.update({k: DEAD_PROXY for k in PROXY_VARS})  # an HTTP client that tries the internet fails at once
        env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
        started = time.monotonic()
        with open(self.log_path, "w", encoding="utf-8") as log:
            log.write(f"$ cd {self.forge} && {' '.join(args)}\n")
            log.flush()
            self.process = subprocess.Popen(
                args, cwd=self.forge, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_until_ready(started, timeout)
        self.startup_seconds = time.monotonic() - started

    def _wait_until_ready(self, started: float, timeout: float) -> None:
        """Until every READY_PATHS answers 200 (the LoRA route is added last, by an app-started callback)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        waiting = list(READY_PATHS)
        while waiting:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Forge exited with {self.process.returncode} while starting; {self.log_path}:\n{self.log_tail()}"
                )
            if STARTUP_CRASH in self.log_tail(10**6):  # e.g. a script's ui() raised: the API never comes up
                self.stop()
                raise RuntimeError(f"Forge's start-up thread raised; {self.log_path}:\n{self.log_tail()}")
            try:
                with opener.open(self.url + waiting[0], timeout=5) as response:
                    if response.status == 200:
                        waiting.pop(0)
                        continue
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - started > timeout:
                self.stop()
                raise TimeoutError(f"Forge did not answer within {timeout:.0f} s; {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, grace: float = 20.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)  # the group of the process started above (start_new_session)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(grace)
