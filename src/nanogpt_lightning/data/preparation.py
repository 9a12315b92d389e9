"""What the data.* settings name (a corpus: files, a URL or a Hugging Face dataset; a tokenizer; a validation
fraction) and where its prepared data lies; preparing it, and refusing in one line data that is missing or
damaged. No torch: scripts/prepare.py uses it alone, TextDataModule (data/datamodule.py) is built on it."""

from __future__ import annotations

import inspect
import json
import shlex
from pathlib import Path

from nanogpt_lightning.data.hf import HFDataset
from nanogpt_lightning.data.nanogpt import nanogpt_data
from nanogpt_lightning.data.prepare import (
    TINY_SHAKESPEARE_URL,
    damage,
    default_cache_dir,
    download,
    identity_of,
    prepare,
    prepare_command,
)
from nanogpt_lightning.data.shards import SHARD_TOKENS
from nanogpt_lightning.data.sources import Corpus, FileInfoCache, Source, TextFile, open_files
from nanogpt_lightning.errors import UserError


class Preparation:
    """The data named by the preparation's settings. The corpus is `input_file` (a file, folder or glob),
    else the text at `url` (checked against `sha256` when given, and then known by it: the same bytes
    prepared from a local copy are found too). Found once: the data in use stays the same for the object's
    life."""

    def __init__(self, data_dir: str, tokenizer: str = "char", input_file: str | None = None,
                 url: str | None = TINY_SHAKESPEARE_URL, cache_dir: str | None = None, block_size: int = 64,
                 val_fraction: float = 0.1, text_field: str = "text", num_proc: int | None = None,
                 shard_tokens: int = SHARD_TOKENS, sha256: str | None = None, dataset: str | None = None,
                 subset: str | None = None, split: str = "train", revision: str | None = None,
                 nanogpt_dir: str | None = None):
        self.data_dir = Path(data_dir)
        self.tokenizer = tokenizer
        self.input_file = Path(input_file).expanduser() if input_file else None
        self.url = url
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.block_size = block_size
        self.val_fraction = val_fraction
        self.text_field = text_field
        self.num_proc = num_proc
        self.shard_tokens = shard_tokens
        self.sha256 = sha256
        self.dataset = {"dataset": dataset, "subset": subset, "split": split, "revision": revision}
        self.nanogpt_dir = Path(nanogpt_dir).expanduser() if nanogpt_dir else None
        self._source: Source | None = None
        self._corpus: Corpus | None = None
        self._meta: dict | None = None

    def _identify(self) -> Source:
        if self._source is None:
            if self.nanogpt_dir is not None:  # used as it is: its meta is known at once
                self._source, self._meta = nanogpt_data(self.nanogpt_dir, self._cache())
            elif self.dataset["dataset"]:
                self._corpus = HFDataset(**self.dataset, text_field=self.text_field, val_fraction=self.val_fraction,
                                         cache=self._cache())
                self._source = self._corpus.source
            elif self.input_file is not None:
                self._corpus = open_files(str(self.input_file), self.val_fraction, self.text_field, self.cache_dir)
                self._source = self._corpus.source
            elif self.url:
                self._source = Source(self.url, self.sha256)
            else:
                raise UserError("no data: pass a text file with data.input_file=PATH")
        return self._source

    def _cache(self) -> FileInfoCache:
        return FileInfoCache(self.cache_dir / "file-info.json")

    def _open_corpus(self) -> Corpus:
        """The corpus, to write its data: the local files as they were when found, or the text at the URL."""
        if self._corpus is None:
            path = download(self.url, self.cache_dir, self.sha256)
            self._corpus = TextFile(path, FileInfoCache(None).info(path), self.val_fraction)
        return self._corpus

    def prepare_data(self, force: bool = False) -> None:
        """Prepare the data unless it is there and whole; `force` rebuilds it anyway (atomically, going on
        from the whole shards of an interrupted preparation). A nanoGPT folder is only checked."""
        if self.nanogpt_dir is not None:
            self._identify()
            return
        prepare(self.data_dir, self._identify(), self._open_corpus, self.tokenizer, self.val_fraction,
                self.block_size, force, self.num_proc, self.shard_tokens)

    @property
    def prepared_dir(self) -> Path:
        """The directory of this data under `data_dir` (there or not); a nanoGPT folder is its own."""
        if self.nanogpt_dir is not None:
            return self.nanogpt_dir
        return self.data_dir / self._identify().dir_name(self.tokenizer, self.val_fraction)

    def prepare_command(self) -> str:
        """The scripts/prepare.py command line that prepares this data, for messages."""
        if self.dataset["dataset"]:
            named = [f"data.{key}={value}" for key, value in self.dataset.items() if value is not None]
            return shlex.join(["python", "scripts/prepare.py", "data=hf", *named, f"data.tokenizer={self.tokenizer}",
                               f"data.val_fraction={self.val_fraction}", f"data.data_dir={self.data_dir}"])
        source = str(self.input_file) if self.input_file is not None else self.url
        return prepare_command(source, self.tokenizer, self.val_fraction, self.data_dir)

    def _checked_dir(self) -> Path:
        """`prepared_dir`, refused in one line unless whole; checked once, its meta.json then kept."""
        directory = self.prepared_dir
        self._identify()
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


def preparation_from_settings(data) -> Preparation:
    """The Preparation of a composed `data` config group: its settings but the loader's (which only training
    reads)."""
    settings = {key: value for key, value in data.items() if key in inspect.signature(Preparation).parameters}
    return Preparation(**settings)
