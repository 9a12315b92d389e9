"""Random (x, y) windows of a token bin, y = x shifted by one, keyed so that a resumed run sees the same batches.

Each training batch is drawn from its own random stream keyed by (seed, split, rank, batch index), and each
evaluation batch by (seed, split, rank, the evaluation's step, batch index), so a resumed run sees exactly the
batches an uninterrupted one would have seen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from nanogpt_lightning.data.prepare import TOKEN_DTYPE


class RandomWindows(IterableDataset):
    """Batches of random (x, y) windows of one token bin, y = x shifted by one.

    `num_batches=None` streams forever. Batch i is drawn from the stream keyed (*key, i), starting at
    `start`, so the sequence depends only on the key and the start, never on what was drawn before.
    The bin is opened once and kept open, so the data stays the same while the dataset lives.
    """

    def __init__(self, bin_path: Path, block_size: int, batch_size: int, key: tuple[int, ...],
                 start: int = 0, num_batches: int | None = None):
        self.bin_path = bin_path
        self.block_size = block_size
        self.batch_size = batch_size
        self.key = key
        self.start = start
        self.num_batches = num_batches
        self._tokens = None

    def __getstate__(self) -> dict:
        # a worker process started by spawn opens the bin itself: pickling a memmap would copy the data
        return {**self.__dict__, "_tokens": None}

    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.bin_path, dtype=TOKEN_DTYPE, mode="r")
        return self._tokens

    def batches(self, key: tuple[int, ...], start: int):
        tokens = self.tokens()
        window = np.arange(self.block_size + 1)
        worker = torch.utils.data.get_worker_info()
        first, stride = (0, 1) if worker is None else (worker.id, worker.num_workers)
        end = None if self.num_batches is None else start + self.num_batches
        index = start + first
        while end is None or index < end:
            rng = np.random.default_rng([*key, index])
            starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)
            windows = torch.from_numpy(tokens[starts[:, None] + window].astype(np.int64))
            yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
            index += stride

    def __iter__(self):
        return self.batches(self.key, self.start)


class EvalWindows(RandomWindows):
    """`num_batches` batches per pass, keyed also by `step()` when the pass starts (the trainer's step):
    an evaluation at a given step sees the same batches whether or not the run was resumed on the way."""

    def __init__(self, bin_path: Path, block_size: int, batch_size: int, key: tuple[int, ...], num_batches: int,
                 step: Callable[[], int]):
        super().__init__(bin_path, block_size, batch_size, key, num_batches=num_batches)
        self.step = step

    def __iter__(self):
        return self.batches((*self.key, self.step()), 0)
