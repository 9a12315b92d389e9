"""The device's peak FLOP/s, for the model FLOPs utilisation (MFU) that nanoGPT prints on its `iter` lines.

nanoGPT divides by the A100's bfloat16 peak whatever the device. Here: the datasheet's dense peak of the
NVIDIA GPUs in GPU_PEAKS in the dtype the run multiplies in, else (a CPU, an Apple GPU, another GPU) the best
rate of square matmuls measured on the spot in that dtype: rough, but of this machine.
"""

from __future__ import annotations

import functools
import re
from time import perf_counter
from typing import NamedTuple

import torch

TF32 = "tf32"  # float32 matmuls on tensor cores (matmul_precision=high or medium)
# dense peaks in FLOP/s from NVIDIA's datasheets (SXM parts unless named); float16 runs at the bfloat16 rate
GPU_PEAKS = {
    "A100": {torch.bfloat16: 312e12, TF32: 156e12, torch.float32: 19.5e12},
    "H100 PCIe": {torch.bfloat16: 756e12, TF32: 378e12, torch.float32: 51.2e12},
    "H100": {torch.bfloat16: 989e12, TF32: 494.7e12, torch.float32: 66.9e12},
    "H200": {torch.bfloat16: 989e12, TF32: 494.7e12, torch.float32: 66.9e12},
    "L4": {torch.bfloat16: 121e12, TF32: 60e12, torch.float32: 30.3e12},
}
MEASURE_SECONDS = 0.2  # the on-the-spot peak: the best of the matmuls that fit in this time


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it has seen the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def square_matmul_flops(n: int) -> float:
    return 2 * n**3


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a Lightning precision (`32-true`, `bf16-mixed`, ...) multiplies in."""
    return {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}.get(precision.split("-")[0],
                                                                                  torch.float32)


def datasheet_peak(device_name: str, dtype: torch.dtype | str) -> float | None:
    """The dense peak of a GPU named `device_name` (torch.cuda.get_device_name) in `dtype`; None when
    GPU_PEAKS does not list the GPU or the dtype."""
    for gpu, peaks in GPU_PEAKS.items():
        if re.search(rf"\b{re.escape(gpu)}\b", device_name):
            return peaks.get(torch.bfloat16 if dtype == torch.float16 else dtype)
    return None


@functools.cache
def measured_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The best FLOP/s of square matmuls in `dtype` on `device` over MEASURE_SECONDS (once per process)."""
    n = 512 if device.type == "cpu" else 4096
    numbers = torch.Generator().manual_seed(0)  # its own: the run's random state is left as it was (exact resume)
    a, b = (torch.randn(n, n, generator=numbers).to(device, dtype) for _ in range(2))
    torch.mm(a, b)  # the first call sets the library up
    synchronize(device)
    best, start = 0.0, perf_counter()
    while perf_counter() - start < MEASURE_SECONDS:
        begin = perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = max(best, square_matmul_flops(n) / (perf_counter() - begin))
    return best


class Peak(NamedTuple):
    flops: float  # FLOP/s
    source: str  # where it comes from, for the line that names it
    measured: bool  # measured here (no datasheet): a busy moment can make it low, so it may be measured again


def peak_flops(device: torch.device, precision: str, again: bool = False) -> Peak:
    """The peak FLOP/s of `device` for a run in Lightning's `precision`; `again`: a measured one anew."""
    dtype = compute_dtype(precision)
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
        peak = datasheet_peak(name, TF32 if tf32 else dtype)
        if peak is not None:
            return Peak(peak, f"the {name}'s datasheet {TF32 if tf32 else dtype_name} peak", measured=False)
    if again:
        measured_peak.cache_clear()
    threads = torch.get_num_threads()
    threads = f" with {threads} thread{'s' * (threads > 1)}" if device.type == "cpu" else ""
    return Peak(measured_peak(device, dtype), f"a {dtype_name} matmul peak measured on this {device.type}{threads}",
                measured=True)
