"""What bench times: the variants (loops) in each precision, their participants' names and their configs."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from nanogpt_lightning.devices import MIXED_PRECISION_DTYPES, auto_precision, check_precision
from nanogpt_lightning.errors import UserError, naming

VARIANTS = ("plain", "plain+tuned", "lightning", "lightning+fused")
LOW_PRECISION_VARIANTS = ("plain", "lightning+fused")  # the reference and ours, in each low precision
COMPILED_VARIANTS = ("plain+compile", "lightning+fused+compile")  # the same two compiled, in each precision
COMPILED = "+compile"
FLOAT32 = "32-true"


def participant_name(variant: str, precision: str) -> str:
    return variant if precision == FLOAT32 else f"{variant} {precision}"


def precision_variants(precision: str, compiled: bool) -> tuple[str, ...]:
    """The loops timed in one precision: all four in float32, the reference and ours in a low one; with
    `compiled`, also those two compiled."""
    variants = VARIANTS if precision == FLOAT32 else LOW_PRECISION_VARIANTS
    return variants + (COMPILED_VARIANTS if compiled else ())


def bench_precisions(wanted: str, device: torch.device) -> list[str]:
    """32-true first, then the low precisions asked for (`auto`: what trainer.precision=auto picks here)."""
    precisions = [FLOAT32]
    for name in filter(None, (part.strip() for part in wanted.split(","))):
        name = auto_precision(device) if name == "auto" else name
        if name != FLOAT32 and name not in MIXED_PRECISION_DTYPES:
            raise UserError(f"--precisions takes 32-true, {', '.join(MIXED_PRECISION_DTYPES)} or auto, "
                            f"got {name!r}")
        with naming(key="--precisions"):
            check_precision(name, device)
        if name not in precisions:
            precisions.append(name)
    return precisions


def variant_config(cfg: DictConfig, fused_loss: bool, max_steps: int, accelerator: str,
                   precision: str = FLOAT32, compiled: bool = False) -> DictConfig:
    cfg = cfg.copy()
    cfg.model.fused_loss = fused_loss
    cfg.model.compile = compiled
    cfg.trainer.max_steps = max_steps
    cfg.trainer.accelerator = accelerator
    cfg.trainer.precision = precision
    return cfg
