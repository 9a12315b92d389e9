"""The learning-rate schedules `conf/scheduler/` builds (optimizers: optimizers.py)."""

from __future__ import annotations

import math
from typing import Callable

from torch.optim.lr_scheduler import LambdaLR

from nanogpt_lightning.train.settings import warmup_refusal


class WarmupCosineLR(LambdaLR):
    """nanoGPT's schedule: linear warmup, cosine decay to `min_lr` at `lr_decay_iters`, then flat.

    `cooldown` < 1 holds the peak after warmup and decays over only the last `cooldown` fraction of the
    span from warmup to lr_decay_iters (warmup-stable-decay, as modded-nanogpt trains); `decay` is the
    shape of that decay: `cosine` or `linear`.

    Under a time budget (callbacks.TimeBudget calls `follow`) the schedule runs on time instead: its position
    is the fraction of the budget used times lr_decay_iters, so it ends at min_lr when the budget does.
    """

    def __init__(self, optimizer, warmup_iters: int, lr_decay_iters: int, min_lr: float, decay_lr: bool = True,
                 cooldown: float = 1.0, decay: str = "cosine"):
        max_lr = optimizer.param_groups[0]["lr"]
        too_long = warmup_refusal(warmup_iters, lr_decay_iters, decay_lr)  # the training config's check too
        if too_long:
            raise ValueError(too_long)
        if not 0 < cooldown <= 1:
            raise ValueError(f"scheduler.cooldown must be in (0, 1], got {cooldown}")
        if decay not in ("cosine", "linear"):
            raise ValueError(f"scheduler.decay must be cosine or linear, got {decay!r}")
        decay_start = lr_decay_iters - cooldown * (lr_decay_iters - warmup_iters)
        self._fraction_used: Callable[[], float] | None = None

        def lr_at(it: float) -> float:
            if not decay_lr:
                return max_lr
            if self._fraction_used is not None:
                it = self._fraction_used() * lr_decay_iters
            if it < warmup_iters:
                return max_lr * (it + 1) / (warmup_iters + 1)
            if it > lr_decay_iters:
                return min_lr
            if it < decay_start:
                return max_lr
            ratio = (it - decay_start) / (lr_decay_iters - decay_start)
            left = 0.5 * (1.0 + math.cos(math.pi * ratio)) if decay == "cosine" else 1.0 - ratio
            return min_lr + left * (max_lr - min_lr)

        super().__init__(optimizer, lambda it: lr_at(it) / max_lr)

    def follow(self, fraction_used: Callable[[], float]) -> None:
        """Take the schedule's position from a time budget: `fraction_used()` in [0, 1]."""
        self._fraction_used = fraction_used

    def state_dict(self):
        state = super().state_dict()
        state.pop("_fraction_used", None)  # the clock belongs to the run, not to the checkpoint
        return state
