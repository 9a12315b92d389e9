"""Fewer page faults for the big short-lived tensors of a training step on a Linux CPU.

A step allocates and frees tensors of megabytes many times (logits chunks, the (vocab x n_embd) gradients of
the tied embedding); by default each comes fresh from the kernel, page-faulted and zeroed every time.
`tune_cpu_memory` makes two process-wide settings; the scripts (train, prepare, bench) call it first thing,
before torch is imported; importing the package does not (it must not change a notebook's process):

- THP_MEM_ALLOC_ENABLE=1: PyTorch backs CPU tensors of 2 MB and more with transparent huge pages
  (512x fewer faults for them). torch reads it once, when it starts.
- glibc's malloc serves every block from its heap, never from a fresh mapping, and keeps up to 1 GiB of
  freed heap for reuse (mallopt M_MMAP_MAX=0 and M_TRIM_THRESHOLD, the usual recipe against page faults):
  a training step then reuses the same memory every time, at a somewhat higher resident peak.

THP_MEM_ALLOC_ENABLE in the environment wins over the first; any glibc malloc setting in the environment
(MALLOC_* variables, glibc.malloc tunables) leaves malloc alone; NANOGPT_TUNE_CPU_MEMORY=0 turns both
off. Figures: docs/performance.md.
"""

import ctypes
import os
import platform
import sys

OFF_SWITCH = "NANOGPT_TUNE_CPU_MEMORY"
TRIM_THRESHOLD = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h


def _environment_sets_malloc() -> bool:
    return (any(key.startswith("MALLOC_") for key in os.environ)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def tune_cpu_memory() -> None:
    if os.environ.get(OFF_SWITCH) == "0" or sys.platform != "linux":
        return
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if platform.libc_ver()[0] != "glibc" or _environment_sets_malloc():
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
