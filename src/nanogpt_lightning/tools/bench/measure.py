"""Measuring: the matmul bursts' size and FLOPs, and the peak memory of training iterations (waiting for the
device before reading the time: flops.synchronize, shared with the iteration lines' MFU)."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch

from nanogpt_lightning.flops import square_matmul_flops

MATMULS_PER_TURN = 5


def matmul_size(device: torch.device) -> int:
    return 2048 if device.type == "cpu" else 8192


def matmul_flops(device: torch.device) -> float:
    """FLOPs of one burst of MATMULS_PER_TURN square matmuls."""
    return MATMULS_PER_TURN * square_matmul_flops(matmul_size(device))


class TrainingMemory:
    """Peak memory of the warm-up iterations above what the process held before the first one (model,
    data, and for Lightning its set-up): device allocator stats on cuda; on a Linux CPU the resident-set
    high-water mark, reset (/proc/self/clear_refs) after glibc's free memory is handed back (malloc_trim).
    Whatever a variant keeps from one iteration to the next (optimizer state, buffers) counts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated minus memory_allocated before the first iteration"
        elif device.type == "cpu" and sys.platform == "linux":
            try:
                self._malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
                self.method = "VmHWM minus VmRSS before the first iteration (Linux /proc, after malloc_trim)"
            except (OSError, AttributeError):
                pass

    @staticmethod
    def _proc_status_bytes(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def start(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        if self.method is None:
            return None
        self._malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return self._proc_status_bytes("VmRSS")

    def peak_above(self, start: int | None) -> int | None:
        if start is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - start
        return self._proc_status_bytes("VmHWM") - start
