"""What a device name means (`auto`, `gpu`, `cuda`, `mps`, `cpu`): one answer for training, bench and sampling."""

from __future__ import annotations

import torch

from nanogpt_lightning.errors import UserError

PREFERENCE = ("cuda", "mps", "cpu")  # best first: what `auto` picks, as Lightning's accelerator=auto does
NAMES = ("auto", "gpu", *PREFERENCE)


def available_devices() -> list[str]:
    """The device types present on this machine, best first; cpu is always there."""
    present = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    return [name for name in PREFERENCE if present[name]]


def pick_device(name: str, key: str) -> torch.device:
    """The device `name` stands for: `auto` the best present, `gpu` cuda or mps, else the named one.

    `key` is the setting the name came from (`device`, `trainer.accelerator`), for the error messages.
    """
    if name not in NAMES:
        raise UserError(f"{key} must be one of {', '.join(NAMES)}, got {name!r}")
    available = available_devices()
    wanted = {"auto": available, "gpu": [d for d in available if d != "cpu"]}.get(name, [name])
    chosen = next((d for d in wanted if d in available), None)
    if chosen is None:
        listed = ["cpu", *available[:-1]]  # what every machine has first, then the rest best first
        raise UserError(f"{key}={name} is not available here; available: {', '.join(listed)} (or {key}=auto)")
    return torch.device(chosen)
