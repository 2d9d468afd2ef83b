"""Peak memory of a stretch of code, measured.

CUDA: ``torch.cuda.max_memory_allocated`` above the memory held at the start. CPU: the rise of the process's
peak resident set (VmHWM in /proc/self/status, reset through /proc/self/clear_refs after glibc's malloc_trim
hands freed heap back) over the resident set at the start. The CPU number counts every page the code touches
(torch's allocations and the allocator's), not Python objects only.
"""

from __future__ import annotations

import ctypes

import torch


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Hand freed heap memory back to the OS (glibc malloc_trim), then reset VmHWM to the current RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.bytes`` is the peak above the start (None when the
    platform cannot measure it)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.bytes: int | None = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = _proc_status_kib("VmRSS") * 1024 if _reset_peak_rss() else None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._start
        elif self._start is not None:
            self.bytes = _proc_status_kib("VmHWM") * 1024 - self._start
        return False


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"
