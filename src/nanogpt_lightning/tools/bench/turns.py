"""Taking turns: the participants (processes) run one at a time (Turns), each timing its own iterations
and handing over at the end of each of its turns (Clock)."""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter

import numpy as np
import torch

from nanogpt_lightning.flops import synchronize
from nanogpt_lightning.tools.bench.measure import TrainingMemory


class Turns:
    """Lets the participants (processes) run one at a time, in order, each until it hands over; the
    first turn starts once all of them are built and waiting."""

    def __init__(self, n: int, context):
        self._cond = context.Condition()
        self._turn = context.Value("i", 0, lock=False)  # guarded by _cond
        self._done = context.Array("b", n, lock=False)
        self._ready = context.Barrier(n)

    def wait(self, i: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn.value == i)

    def wait_for_all_then_first_turn(self, i: int) -> None:
        self._ready.wait()
        self.wait(i)

    def abort(self) -> None:
        self._ready.abort()

    def hand_over(self, i: int, finished: bool = False) -> None:
        with self._cond:
            self._done[i] = self._done[i] or finished
            n = len(self._done)
            for k in range(1, n + 1):
                if not self._done[(i + k) % n]:
                    self._turn.value = (i + k) % n
                    break
            self._cond.notify_all()


@dataclass
class Clock:
    """Times one participant's iterations (`tick` ends one) and hands over at the end of each turn."""

    index: int
    turns: Turns
    turn_lengths: list[int]  # iterations per turn; the first turn is warm-up
    device: torch.device
    memory: TrainingMemory | None  # measures the warm-up iterations
    times: list[float] = field(default_factory=list)  # seconds of each iteration after warm-up
    peak_memory: int | None = None
    _ticks: int = 0
    _discard: bool = False

    def start(self) -> None:
        """Wait until every participant is built, then for this one's first turn."""
        self.turns.wait_for_all_then_first_turn(self.index)

    def begin_iterations(self) -> None:
        """Call right before the first iteration."""
        self._memory_start = self.memory.start() if self.memory is not None else None
        self._last = perf_counter()

    def discard_current(self) -> None:
        """Leave the running iteration out (e.g. it ran an evaluation)."""
        self._discard = True

    def tick(self) -> None:
        synchronize(self.device)
        elapsed = perf_counter() - self._last
        self._ticks += 1
        warmup = self.turn_lengths[0]
        if self._ticks > warmup and not self._discard:
            self.times.append(elapsed)
        self._discard = False
        if self.memory is not None and self._ticks == warmup:
            self.peak_memory = self.memory.peak_above(self._memory_start)
        ends = np.cumsum(self.turn_lengths)
        if self._ticks in ends[:-1]:  # after the last turn the loop ends and the participant hands over
            self.turns.hand_over(self.index)
            self.turns.wait(self.index)
        self._last = perf_counter()
