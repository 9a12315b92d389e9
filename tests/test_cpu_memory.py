"""tune_cpu_memory (which the scripts call first) makes the CPU memory settings of cpu_memory.py, unless the
environment says; importing the package alone makes none."""

import os
import platform
import subprocess
import sys

import pytest

TUNE = "from nanogpt_lightning.cpu_memory import tune_cpu_memory; tune_cpu_memory()"
SHOW_HUGE_PAGES = f"import os; {TUNE}; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
# where glibc's malloc puts a 100 MB block (a fresh mapping, or its heap) and whether freeing it keeps it for reuse
PROBE_MALLOC = """
import ctypes
import sys
if sys.argv[1:] == ["tune"]:
    from nanogpt_lightning.cpu_memory import tune_cpu_memory
    tune_cpu_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(100 * 2**20)
mapped = ctypes.c_size_t.from_address(block - 8).value & 2  # the chunk header's IS_MMAPPED bit
libc.free(ctypes.c_void_p(block))
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo2
print("mapped" if mapped else "heap", "kept" if libc.mallinfo2().keepcost >= 100 * 2**20 else "released")
"""
SETTINGS = ("THP_MEM_ALLOC_ENABLE", "NANOGPT_TUNE_CPU_MEMORY", "GLIBC_TUNABLES")
_libc, _version = platform.libc_ver()
linux_glibc = pytest.mark.skipif(
    sys.platform != "linux" or _libc != "glibc" or tuple(map(int, _version.split("."))) < (2, 33),
    reason="the malloc settings are glibc's (mallinfo2 since 2.33)")


def run(code: str, *args: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", code, *args], env={**clean, **env}, capture_output=True,
                            text=True, check=True)
    return result.stdout.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="PyTorch's huge pages are Linux's")
@pytest.mark.parametrize("env, expected", [
    ({}, "1"),
    ({"THP_MEM_ALLOC_ENABLE": "0"}, "0"),
    ({"THP_MEM_ALLOC_ENABLE": "1"}, "1"),
    ({"NANOGPT_TUNE_CPU_MEMORY": "0"}, "None"),
])
def test_huge_pages_default_on_and_the_environment_wins(env, expected):
    assert run(SHOW_HUGE_PAGES, **env) == expected


@linux_glibc
@pytest.mark.parametrize("env, expected", [
    ({}, "heap kept"),
    ({"NANOGPT_TUNE_CPU_MEMORY": "0"}, "mapped released"),  # glibc's defaults
    # any malloc setting of the environment leaves malloc to it
    ({"MALLOC_ARENA_MAX": "2"}, "mapped released"),
    ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, "mapped released"),
    ({"MALLOC_TRIM_THRESHOLD_": str(2**30)}, "mapped released"),
])
def test_big_blocks_come_from_the_heap_and_stay_there_unless_the_environment_says(env, expected):
    assert run(PROBE_MALLOC, "tune", **env) == expected


@linux_glibc
def test_importing_the_package_changes_nothing_process_wide():
    code = PROBE_MALLOC.replace("import ctypes", "import ctypes, os, nanogpt_lightning.train.run") + (
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    assert run(code).splitlines() == ["mapped released", "None"]
