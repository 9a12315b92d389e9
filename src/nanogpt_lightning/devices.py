"""What a device name means (`auto`, `gpu`, `cuda`, `mps`, `cpu`): one answer for training, bench and sampling."""

from __future__ import annotations

import contextlib
import shutil

import torch

from nanogpt_lightning.errors import SettingError

PREFERENCE = ("cuda", "mps", "cpu")  # best first: what `auto` picks, as Lightning's accelerator=auto does
NAMES = ("auto", "gpu", *PREFERENCE)


def available_devices() -> list[str]:
    """The device types present on this machine, best first; cpu is always there."""
    present = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    return [name for name in PREFERENCE if present[name]]


def pick_device(name: str) -> torch.device:
    """The device `name` stands for: `auto` the best present, `gpu` cuda or mps, else the named one.

    Its errors name the setting `device` (sampling's, evaluation's); training names trainer.accelerator (naming).
    """
    if name not in NAMES:
        raise SettingError(lambda key="device": f"{key} must be one of {', '.join(NAMES)}, got {name!r}")
    available = available_devices()
    wanted = {"auto": available, "gpu": [d for d in available if d != "cpu"]}.get(name, [name])
    chosen = next((d for d in wanted if d in available), None)
    if chosen is None:
        listed = ["cpu", *available[:-1]]  # what every machine has first, then the rest best first
        raise SettingError(lambda key="device": f"{key}={name} is not available here; available: "
                           f"{', '.join(listed)} (or {key}=auto)")
    return torch.device(chosen)


def cpu_has_bfloat16_units() -> bool:
    """AMX (Intel Xeon 4th gen and later) or AVX512-BF16 (e.g. AMD Zen 4): bfloat16 matmuls run faster than
    float32 ones there (2-7x measured, docs/performance.md). Asked of PyTorch's own CPU feature check,
    private to it: where that is missing, the answer is no and runs stay in float32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)


def mps_has_bfloat16() -> bool:
    """PyTorch computes bfloat16 on Apple GPUs from macOS 14 (Sonoma)."""
    is_macos_or_newer = getattr(torch.backends.mps, "is_macos_or_newer", None)
    return is_macos_or_newer is not None and is_macos_or_newer(14, 0)


def computes_bfloat16_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere and later
    if device.type == "mps":
        return mps_has_bfloat16()
    return device.type == "cpu" and cpu_has_bfloat16_units()


def auto_precision(device: torch.device) -> str:
    """What trainer.precision=auto (and sample.py's precision=auto) means on `device`: bfloat16 mixed
    precision where the device computes bfloat16 fast, else float32."""
    return "bf16-mixed" if computes_bfloat16_fast(device) else "32-true"


# the low precision of each mixed precision (what autocast computes in)
MIXED_PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# Lightning's short names for its precisions (trainer.precision accepts them too)
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def autocast_for(precision: str, device: torch.device):
    """The context a forward pass runs in outside Lightning (sampling, bench's plain loop): autocast in the
    low precision of a mixed precision, else nothing."""
    dtype = MIXED_PRECISION_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device lacks, in one line (Lightning would quietly swap 16-mixed for bf16 on cpu).

    Its errors name sample.py's setting `precision`; training and bench name theirs (naming)."""
    if precision in ("16-mixed", "16") and device.type == "cpu":
        raise SettingError(lambda key="precision": f"{key}={precision} (float16 with loss scaling) needs cuda or "
                           f"mps; on cpu pass {key}=bf16-mixed or {key}=auto")
    if precision in ("bf16-mixed", "bf16") and device.type == "mps" and not mps_has_bfloat16():
        raise SettingError(lambda key="precision": f"{key}={precision} needs macOS 14 or newer on mps; "
                           f"pass {key}=16-mixed or {key}=32-true")


def check_compile(device: torch.device) -> None:
    """Refuse torch.compile in one line where it cannot work, instead of failing at the first iteration.

    Its errors say how training asks for it and switches it off; bench names its flags (naming)."""
    if not torch._dynamo.is_dynamo_supported():
        raise SettingError(lambda asked_by="model.compile=true", switch_off="model.compile=false":
                           f"{asked_by}: torch.compile does not support this Python or platform; pass {switch_off}")
    if device.type == "cpu" and not any(shutil.which(name) for name in ("g++", "clang++", "c++", "cl")):
        raise SettingError(lambda asked_by="model.compile=true", switch_off="model.compile=false":
                           f"{asked_by}: torch.compile on cpu needs a C++ compiler (g++ or clang++) on the PATH; "
                           f"install one or pass {switch_off}")
