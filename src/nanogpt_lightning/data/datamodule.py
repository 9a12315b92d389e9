"""The LightningDataModule: prepares the corpus named by the data.* settings (data/sources.py, data/prepare.py)
and serves random windows of its shards (data/windows.py); the vocabulary and the tokenizer come from the
prepared data."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from nanogpt_lightning.data.preparation import Preparation
from nanogpt_lightning.data.prepare import check_long_enough
from nanogpt_lightning.data.shards import open_split
from nanogpt_lightning.data.windows import EvalWindows, RandomWindows
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.metrics import SPLITS


class TextDataModule(Preparation, L.LightningDataModule):
    """A corpus tokenized into memmapped shards; random training windows and eval batches of both splits.

    What to prepare, and where, is Preparation's (the data.* settings but the loader's); the vocabulary and
    the tokenizer are read from the prepared data (`meta`), never configured. The data in use
    (`prepared_dir`) is fixed for the module's life once found or prepared.
    """

    def __init__(self, data_dir: str, batch_size: int = 12, eval_iters: int = 20, num_workers: int = 0,
                 seed: int = 1337, **preparation):
        L.LightningDataModule.__init__(self)
        Preparation.__init__(self, data_dir, **preparation)
        self.batch_size = batch_size
        self.eval_iters = eval_iters
        self.num_workers = num_workers
        self.seed = seed
        self._open: dict[str, list[np.memmap]] | None = None

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            check_long_enough(split, self.meta["tokens"][split], self.block_size)
        self._shards()  # open before training: a run then goes on to its end whatever happens to the files

    def _shards(self) -> dict[str, list[np.memmap]]:
        """Both splits' shards, opened once and kept: every loader reads these memmaps, so the data stays the
        same (training and evaluation go on) even if the prepared data is deleted or rebuilt meanwhile."""
        if self._open is None:
            directory = self._checked_dir()
            try:
                self._open = {split: open_split(directory, self.meta, split) for split in SPLITS}
            except FileNotFoundError:  # gone since it was checked
                raise UserError(f"the prepared data in {directory} disappeared after it was checked; prepare it "
                                f"again with {self.prepare_command()}") from None
        return self._open

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        # continue the stream where a resumed run stopped: one batch per micro-step so far
        start = 0
        if self.trainer is not None:
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        dataset = RandomWindows(self._shards()["train"], block_size=self.block_size, batch_size=self.batch_size,
                                key=(self.seed, 0, self._rank()), start=start)
        # a generator of its own: starting an iterator must not draw from torch's global one (dropout's)
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator())

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per split (train, val), `eval_iters` batches per evaluation, chosen by its step.

        No worker processes: a worker would keep the step its copy of the dataset saw when it started.
        """
        return [
            DataLoader(EvalWindows(self._shards()[split], block_size=self.block_size, batch_size=self.batch_size,
                                   key=(self.seed, 1 + i, self._rank()), num_batches=self.eval_iters,
                                   step=self._step),
                       batch_size=None, num_workers=0, generator=torch.Generator())
            for i, split in enumerate(SPLITS)
        ]
