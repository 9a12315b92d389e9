"""Text -> uint16 token bins + metadata, and the LightningDataModule that samples random windows.

`prepare_dataset` writes `train.bin`, `val.bin` and `meta.json` (tokenizer, vocab size, source).
The data module memory-maps the bins and serves random (x, y) windows, y shifted by one token.
Each batch is drawn from its own random stream keyed by (seed, stream, rank, batch index), so a
resumed run sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from nanogpt_lightning.errors import UserError
from nanogpt_lightning.metrics import SPLITS
from nanogpt_lightning.tokenizer import build_tokenizer, tokenizer_from_meta

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanogpt-lightning"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write beside `path`, then rename; the process id keeps processes preparing at once apart."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def download(url: str, cache_dir: Path) -> Path:
    """The text at `url`, fetched once into `cache_dir`."""
    target = cache_dir / Path(url).name
    if target.exists():
        return target
    print(f"downloading {url} -> {target}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise UserError(
            f"could not download {url} ({err}); with no network, pass a local text file: data.input_file=PATH"
        ) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, body)
    return target


def read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"data.input_file {str(path)!r} does not exist or is not a file; pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data.input_file {str(path)!r} is not UTF-8 text; convert it or pass another file") from None
    if not text:
        raise UserError(f"data.input_file {str(path)!r} is empty; pass a file with some text in it")
    return text


def _check_long_enough(split: str, n_tokens: int, block_size: int) -> None:
    if n_tokens <= block_size:
        raise UserError(
            f"the {split} split has {n_tokens} tokens, not more than data.block_size={block_size};"
            " use a longer text or a smaller data.block_size"
        )


def prepare_dataset(input_file: Path, data_dir: Path, tokenizer: str, val_fraction: float = 0.1,
                    block_size: int = 0) -> dict:
    """Split the text (train first, val last), encode both parts, write the bins and metadata.

    A split of no more than `block_size` tokens is refused before anything is written.
    """
    text = read_text(input_file)
    tok = build_tokenizer(tokenizer, text)
    if tok.vocab_size > np.iinfo(np.uint16).max + 1:
        raise UserError(f"a vocabulary of {tok.vocab_size} tokens does not fit uint16 bins; use data.tokenizer=gpt2")
    n_train_chars = int(len(text) * (1 - val_fraction))
    parts = {"train": text[:n_train_chars], "val": text[n_train_chars:]}
    encoded = {split: np.array(tok.encode(part), dtype=np.uint16) for split, part in parts.items()}
    for split, ids in encoded.items():
        _check_long_enough(split, len(ids), block_size)
    data_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, ids in encoded.items():
        _write_atomically(data_dir / f"{split}.bin", ids.tobytes())
        counts[split] = len(ids)
        print(f"{split} has {len(ids):,} tokens")
    meta = {
        "tokenizer": tok.to_meta(),
        "vocab_size": tok.vocab_size,
        "source": str(input_file.resolve()),
        "source_sha256": _sha256(input_file),
        "tokens": counts,
    }
    _write_atomically(data_dir / "meta.json", json.dumps(meta, indent=1).encode())
    return meta


def load_meta(data_dir: Path) -> dict | None:
    path = data_dir / "meta.json"
    if not path.exists() or not all((data_dir / f"{s}.bin").exists() for s in SPLITS):
        return None
    return json.loads(path.read_text())


class RandomWindows(IterableDataset):
    """Batches of random (x, y) windows of one token bin, y = x shifted by one.

    `num_batches=None` streams forever. Batch i is drawn from the stream keyed (*key, i), starting at
    `start`, so the sequence depends only on the key, never on how many batches came before. A finite
    dataset goes on where its last pass ended, so each evaluation sees fresh batches.
    """

    def __init__(self, bin_path: Path, block_size: int, batch_size: int, key: tuple[int, ...],
                 start: int = 0, num_batches: int | None = None):
        self.bin_path = bin_path
        self.block_size = block_size
        self.batch_size = batch_size
        self.key = key
        self.start = start
        self.num_batches = num_batches

    def __iter__(self):
        tokens = np.memmap(self.bin_path, dtype=np.uint16, mode="r")
        window = np.arange(self.block_size + 1)
        worker = torch.utils.data.get_worker_info()
        first, stride = (0, 1) if worker is None else (worker.id, worker.num_workers)
        index = self.start + first
        end = None
        if self.num_batches is not None:
            end = self.start + self.num_batches
            self.start = end
        while end is None or index < end:
            rng = np.random.default_rng([*self.key, index])
            starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)
            windows = torch.from_numpy(tokens[starts[:, None] + window].astype(np.int64))
            yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
            index += stride


class TextDataModule(L.LightningDataModule):
    """A text file tokenized into memmapped bins; random training windows and eval batches of both splits.

    The vocabulary and the tokenizer are read from the prepared data (`meta`), never configured.
    """

    def __init__(self, data_dir: str, tokenizer: str = "char", input_file: str | None = None,
                 url: str | None = TINY_SHAKESPEARE_URL, cache_dir: str | None = None,
                 block_size: int = 64, batch_size: int = 12, eval_iters: int = 20,
                 val_fraction: float = 0.1, num_workers: int = 0, seed: int = 1337):
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("eval_iters", eval_iters)):
            if value <= 0:
                raise UserError(f"data.{name} must be a positive integer, got {value}")
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

    def _is_prepared(self) -> bool:
        meta = load_meta(self.data_dir)
        if meta is None or meta["tokenizer"]["kind"] != self.tokenizer:
            return False
        # an explicit input file must be the one the bins were made from
        return self.input_file is None or (
            self.input_file.is_file() and meta["source_sha256"] == _sha256(self.input_file)
        )

    def prepare_data(self, force: bool = False) -> None:
        """Write the bins unless they are there already (and match `input_file` when one is given).

        `force` re-encodes the text anyway (a downloaded text is still taken from the cache).
        """
        if not force and self._is_prepared():
            return
        if self.input_file is not None:
            source = self.input_file
        elif self.url:
            source = download(self.url, self.cache_dir)
        else:
            raise UserError("no data: pass a text file with data.input_file=PATH")
        try:
            prepare_dataset(source, self.data_dir, self.tokenizer, self.val_fraction, self.block_size)
        except OSError as err:  # the text was read (read_text): this is writing the bins
            raise UserError(f"cannot write the prepared data into data.data_dir={self.data_dir} "
                            f"({err.strerror or err}: {err.filename}); pass a writable data.data_dir") from None

    @property
    def meta(self) -> dict:
        meta = load_meta(self.data_dir)
        if meta is None:
            raise UserError(f"no prepared data in {self.data_dir}; run scripts/prepare.py first")
        return meta

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            _check_long_enough(split, self.meta["tokens"][split], self.block_size)

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _loader(self, dataset: RandomWindows) -> DataLoader:
        # a generator of its own: starting an iterator must not draw from torch's global one (dropout's)
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator())

    def train_dataloader(self) -> DataLoader:
        # continue the stream where a resumed run stopped: one batch per micro-step so far
        start = 0
        if self.trainer is not None:
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return self._loader(RandomWindows(self.data_dir / "train.bin", self.block_size, self.batch_size,
                                          key=(self.seed, 0, self._rank()), start=start))

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per split (train, val), each `eval_iters` fresh random batches per evaluation."""
        return [
            self._loader(RandomWindows(self.data_dir / f"{split}.bin", self.block_size, self.batch_size,
                                       key=(self.seed, 1 + i, self._rank()),
                                       num_batches=self.eval_iters))
            for i, split in enumerate(SPLITS)
        ]
