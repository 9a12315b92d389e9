"""Random (x, y) windows of a split's token shards, y = x shifted by one, keyed so that a resumed run sees the
same batches.

A window lies within one shard; shards are drawn in proportion to their windows (a start is drawn among all
the split's window starts), so one shard is what a single bin always was. Each training batch is drawn from
its own random stream keyed by (seed, split, rank, batch index), and each evaluation batch by (seed, split,
rank, the evaluation's step, batch index), so a resumed run sees exactly the batches an uninterrupted one
would have seen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset


class RandomWindows(IterableDataset):
    """Batches of random (x, y) windows of a split's shards, y = x shifted by one.

    `shards`: one bin's path, a list of paths, or the split's shards already open (memmaps, as
    shards.open_split gives them). `num_batches=None` streams forever. Batch i is drawn from the stream
    keyed (*key, i), starting at `start`, so the sequence depends only on the key and the start, never on
    what was drawn before. The shards are opened once (memmaps) and kept open, so the data stays the same
    while the dataset lives, even if the files are deleted or replaced, and nothing is copied into memory
    however long it runs.
    """

    def __init__(self, shards: Path | list[Path] | list[np.memmap], block_size: int, batch_size: int,
                 key: tuple[int, ...], start: int = 0, num_batches: int | None = None, dtype: np.dtype = np.uint16):
        shards = [shards] if isinstance(shards, Path) else list(shards)
        opened = all(isinstance(shard, np.memmap) for shard in shards)
        self.shards = [Path(shard.filename) for shard in shards] if opened else shards
        self.dtype = shards[0].dtype if opened else np.dtype(dtype)
        self.block_size = block_size
        self.batch_size = batch_size
        self.key = key
        self.start = start
        self.num_batches = num_batches
        self._tokens = shards if opened else None

    def __getstate__(self) -> dict:
        # a worker process started by spawn opens the shards itself: pickling a memmap would copy the data
        return {**self.__dict__, "_tokens": None}

    def tokens(self) -> list[np.ndarray]:
        if self._tokens is None:
            self._tokens = [np.memmap(path, dtype=self.dtype, mode="r") for path in self.shards]
        return self._tokens

    def batches(self, key: tuple[int, ...], start: int):
        shards = self.tokens()
        # window starts of every shard, end to end: a start drawn among them all picks shards by their size
        ends = np.cumsum([max(len(tokens) - self.block_size, 0) for tokens in shards])
        window = np.arange(self.block_size + 1)
        worker = torch.utils.data.get_worker_info()
        first, stride = (0, 1) if worker is None else (worker.id, worker.num_workers)
        end = None if self.num_batches is None else start + self.num_batches
        index = start + first
        while end is None or index < end:
            rng = np.random.default_rng([*key, index])
            starts = rng.integers(0, ends[-1], size=self.batch_size)
            shard_of = np.searchsorted(ends, starts, side="right")
            offsets = starts - np.concatenate([[0], ends])[shard_of]
            windows = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
            for shard in np.unique(shard_of):
                rows = shard_of == shard
                windows[rows] = shards[shard][offsets[rows][:, None] + window]
            windows = torch.from_numpy(windows)
            yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
            index += stride

    def __iter__(self):
        return self.batches(self.key, self.start)


class EvalWindows(RandomWindows):
    """`num_batches` batches per pass, keyed also by `step()` when the pass starts (the trainer's step):
    an evaluation at a given step sees the same batches whether or not the run was resumed on the way."""

    def __init__(self, shards: Path | list[Path] | list[np.memmap], block_size: int, batch_size: int,
                 key: tuple[int, ...], num_batches: int, step: Callable[[], int], dtype: np.dtype = np.uint16):
        super().__init__(shards, block_size, batch_size, key, num_batches=num_batches, dtype=dtype)
        self.step = step

    def __iter__(self):
        return self.batches((*self.key, self.step()), 0)
