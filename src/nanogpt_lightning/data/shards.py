"""Token shards on disk: written whole, resumable after Ctrl+C or a kill, read by memmap.

A split is one or more shards of about `data.shard_tokens` tokens (`train-00000.bin`, ...; a split of one
shard is plain `train.bin`, as before shards), in the token type the vocabulary needs (`uint16` up to 65,536
entries, `uint32` above). meta.json lists them: `"dtype": "uint16"`, `"shards": {"train": [["train.bin",
301966]], "val": [...]}`. Data prepared before shards (no `shards`, no `dtype`) is `train.bin`/`val.bin` of
uint16 tokens, read the same way.

While preparing, each shard is written as `<name>.partial`, flushed, renamed to its name, and then
`progress.json` records it with how far into the corpus it reaches; a preparation started again with the
same settings keeps those shards and goes on after them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from nanogpt_lightning.files import write_whole
from nanogpt_lightning.metrics import SPLITS

SHARD_TOKENS = 100_000_000
PROGRESS = "progress.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token of a vocabulary of `vocab_size`."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def dtype_of(meta: dict) -> np.dtype:
    return np.dtype(meta.get("dtype", "uint16"))


def shards_of(meta: dict, split: str) -> list[tuple[str, int]]:
    """The (file name, tokens) of each shard of `split`; one `<split>.bin` for data prepared before shards."""
    if "shards" in meta:
        return [(name, tokens) for name, tokens in meta["shards"][split]]
    return [(f"{split}.bin", meta["tokens"][split])]


def open_split(directory: Path, meta: dict, split: str) -> list[np.ndarray]:
    """The shards of `split` as read-only memmaps (opened once: nothing is copied into memory)."""
    return [np.memmap(directory / name, dtype=dtype_of(meta), mode="r") for name, _ in shards_of(meta, split)]


def split_tokens(directory: Path, meta: dict, split: str) -> np.ndarray:
    """All the tokens of `split` as one array: the memmap itself when it is one shard (as most are)."""
    shards = open_split(directory, meta, split)
    return shards[0] if len(shards) == 1 else np.concatenate(shards)


def _fsync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


class ShardWriter:
    """Writes the tokens of each split, in order, into shards under `work`, recording progress after each.

    `state` is what the caller counts (units of the corpus done, documents, bytes); it is saved with every
    finished shard, and given back when a preparation with the same `key` finds that progress."""

    def __init__(self, work: Path, key: dict, shard_tokens: int, dtype: np.dtype):
        self.work = work
        self.key = key
        self.shard_tokens = shard_tokens
        self.dtype = np.dtype(dtype)
        self.shards: dict[str, list[list]] = {split: [] for split in SPLITS}
        self.state: dict = {}
        self._split: str | None = None
        self._file = None
        self._tokens = 0
        saved = self._saved()
        if saved is not None:
            self.shards, self.state = saved["shards"], saved["state"]
        kept = {name for shards in self.shards.values() for name, _ in shards} | {PROGRESS}
        for path in work.iterdir():
            if path.name not in kept:
                path.unlink()

    def _saved(self) -> dict | None:
        try:
            saved = json.loads((self.work / PROGRESS).read_text())
        except (OSError, ValueError):
            return None
        if saved.get("key") != self.key or saved.get("shard_tokens") != self.shard_tokens:
            return None
        if not all((self.work / name).is_file() and (self.work / name).stat().st_size == tokens * self.dtype.itemsize
                   for shards in saved["shards"].values() for name, tokens in shards):
            return None
        return saved

    @property
    def whole_tokens(self) -> int:
        return sum(tokens for shards in self.shards.values() for _, tokens in shards)

    def add(self, split: str, ids: np.ndarray) -> None:
        """Append `ids` to `split` (splits come one after the other: a new one closes the last shard)."""
        if split != self._split:
            self.close_shard()
            self._split = split
        if self._file is None:
            name = f"{split}-{len(self.shards[split]):05d}.bin"
            self._file = open(self.work / f"{name}.partial", "wb")
            self._name = name
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self._tokens += len(ids)

    def full(self) -> bool:
        return self._tokens >= self.shard_tokens

    def close_shard(self) -> None:
        """Finish the open shard (flushed, renamed into place) and record the progress with the current state."""
        if self._file is None:
            return
        _fsync_close(self._file)
        self._file = None
        os.replace(self.work / f"{self._name}.partial", self.work / self._name)
        self.shards[self._split].append([self._name, self._tokens])
        self._tokens = 0
        write_whole(self.work / PROGRESS, json.dumps({"key": self.key, "shard_tokens": self.shard_tokens,
                                                      "shards": self.shards, "state": self.state}).encode())

    def finish(self) -> dict[str, list[list]]:
        """Close the last shard; a split of one shard is renamed `<split>.bin`. The shards of each split."""
        self.close_shard()
        (self.work / PROGRESS).unlink(missing_ok=True)
        for split, shards in self.shards.items():
            if len(shards) == 1:
                os.replace(self.work / shards[0][0], self.work / f"{split}.bin")
                shards[0][0] = f"{split}.bin"
        return self.shards

    def abandon(self) -> None:
        """Drop the shard being written (what is kept is whole shards only)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            (self.work / f"{self._name}.partial").unlink(missing_ok=True)
