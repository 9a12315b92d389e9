"""The LightningDataModule: prepares the text named by the data.* settings (data/prepare.py) and serves random
windows of its bins (data/windows.py); the vocabulary and the tokenizer come from the prepared data."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from nanogpt_lightning.data.prepare import (
    TINY_SHAKESPEARE_URL,
    Source,
    check_long_enough,
    damage,
    default_cache_dir,
    download,
    identity_of,
    prepare,
    prepare_command,
    read_input_file,
    sha256_of,
)
from nanogpt_lightning.data.windows import EvalWindows, RandomWindows
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.metrics import SPLITS


class TextDataModule(L.LightningDataModule):
    """A text file tokenized into memmapped bins; random training windows and eval batches of both splits.

    The vocabulary and the tokenizer are read from the prepared data (`meta`), never configured. The
    data in use (`prepared_dir`) is fixed for the module's life once found or prepared.
    """

    def __init__(self, data_dir: str, tokenizer: str = "char", input_file: str | None = None,
                 url: str | None = TINY_SHAKESPEARE_URL, cache_dir: str | None = None,
                 block_size: int = 64, batch_size: int = 12, eval_iters: int = 20,
                 val_fraction: float = 0.1, num_workers: int = 0, seed: int = 1337):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.tokenizer = tokenizer
        self.input_file = Path(input_file).expanduser() if input_file else None
        self.url = url
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_iters = eval_iters
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self._source: Source | None = None
        self._meta: dict | None = None

    def _identify(self) -> Source:
        """The source, found once: the data in use stays the same for the module's life."""
        if self._source is None:
            if self.input_file is not None:
                self._source = Source(str(self.input_file.resolve()), sha256_of(read_input_file(self.input_file)))
            elif self.url:
                self._source = Source(self.url)
            else:
                raise UserError("no data: pass a text file with data.input_file=PATH")
        return self._source

    def _read_source(self) -> bytes:
        """The source's bytes, to write its data: downloaded once, or the local file as it was when found."""
        if self.input_file is None:
            return download(self.url, self.cache_dir).read_bytes()
        data = read_input_file(self.input_file)
        if sha256_of(data) != self._source.sha256:
            raise UserError(f"data.input_file {str(self.input_file)!r} changed while this run was using it; "
                            "run again")
        return data

    def prepare_data(self, force: bool = False) -> None:
        """Prepare the data unless it is there and whole; `force` rebuilds it anyway (atomically)."""
        prepare(self.data_dir, self._identify(), self._read_source, self.tokenizer, self.val_fraction,
                self.block_size, force)

    @property
    def prepared_dir(self) -> Path:
        """The directory of this module's data under `data_dir` (there or not)."""
        return self.data_dir / self._identify().dir_name(self.tokenizer, self.val_fraction)

    def prepare_command(self) -> str:
        """The scripts/prepare.py command line that prepares this module's data, for messages."""
        source = str(self.input_file) if self.input_file is not None else self.url
        return prepare_command(source, self.tokenizer, self.val_fraction, self.data_dir)

    def _checked_dir(self) -> Path:
        """`prepared_dir`, refused in one line unless whole; checked once, its meta.json then kept."""
        directory = self.prepared_dir
        if self._meta is None:
            wrong = damage(directory, self._source, self.tokenizer, self.val_fraction)
            if wrong == "missing":
                raise UserError(f"no prepared data for these data.* settings in {self.data_dir}; "
                                f"prepare it with {self.prepare_command()}")
            if wrong is not None:
                raise UserError(f"prepared data in {directory} is damaged ({wrong}); "
                                f"rebuild it with {self.prepare_command()}")
            self._meta = json.loads((directory / "meta.json").read_text())
        return directory

    @property
    def meta(self) -> dict:
        """meta.json of the data in use."""
        self._checked_dir()
        return self._meta

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def identity(self) -> dict:
        """What the data in use is (identity_of its meta.json)."""
        return identity_of(self.meta)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            check_long_enough(split, self.meta["tokens"][split], self.block_size)

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def _bin(self, split: str) -> Path:
        return self._checked_dir() / f"{split}.bin"

    def train_dataloader(self) -> DataLoader:
        # continue the stream where a resumed run stopped: one batch per micro-step so far
        start = 0
        if self.trainer is not None:
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        dataset = RandomWindows(self._bin("train"), self.block_size, self.batch_size,
                                key=(self.seed, 0, self._rank()), start=start)
        # a generator of its own: starting an iterator must not draw from torch's global one (dropout's)
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator())

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per split (train, val), `eval_iters` batches per evaluation, chosen by its step.

        No worker processes: a worker would keep the step its copy of the dataset saw when it started.
        """
        return [
            DataLoader(EvalWindows(self._bin(split), self.block_size, self.batch_size,
                                   key=(self.seed, 1 + i, self._rank()), num_batches=self.eval_iters,
                                   step=self._step),
                       batch_size=None, num_workers=0, generator=torch.Generator())
            for i, split in enumerate(SPLITS)
        ]
