"""Text -> uint16 token bins + metadata, written whole; what prepared data is, for messages and checkpoints.

Prepared data is known by what it is made from. Each preparation is a directory of its own under
`data_dir`, `<tokenizer>-<12 hex digits>`, the digits hashing the source (the SHA-256 of a local
file's bytes, or the URL of a downloaded text), the tokenizer and the validation fraction; it holds
`train.bin`, `val.bin` and `meta.json`. A directory is written whole beside its place and renamed
into it, so it is there complete or not at all, and a different text or tokenizer never touches it.
Batches are drawn from the bins by data/windows.py, for the LightningDataModule in data/datamodule.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np

from nanogpt_lightning.console import say
from nanogpt_lightning.data.tokenizer import build_tokenizer
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.files import write_whole
from nanogpt_lightning.metrics import SPLITS

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TOKEN_DTYPE = np.uint16
# what a meta.json must hold, and the part of it that identifies the data (stored in checkpoints)
META_KEYS = ("source", "source_bytes", "source_sha256", "tokenizer", "vocab_size", "val_fraction", "tokens")
IDENTITY_KEYS = ("source", "source_sha256", "source_bytes", "tokenizer", "val_fraction", "tokens")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanogpt-lightning"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    """Write and flush to disk: a directory renamed into place after a power cut still holds its bytes."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_tokens(path: Path, ids: np.ndarray) -> None:
    _write_file(path, ids.tobytes())


def download(url: str, cache_dir: Path) -> Path:
    """The text at `url`, fetched once into `cache_dir`."""
    target = cache_dir / Path(url).name
    if target.exists():
        return target
    say(f"downloading {url} -> {target}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise UserError(
            f"could not download {url} ({err}); with no network, pass a local text file: data.input_file=PATH"
        ) from None
    write_whole(target, body)
    return target


def _decode(data: bytes, named: str) -> str:
    """The text of `data`, refused in one line naming it (`named`) unless it is non-empty UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{named} is not UTF-8 text; convert it or pass another file") from None
    if not text:
        raise UserError(f"{named} is empty; pass a file with some text in it")
    return text


def read_input_file(path: Path) -> bytes:
    """The bytes of a local text, refused in one line, naming `path` as given, unless it is non-empty UTF-8."""
    if not path.is_file():
        raise UserError(f"data.input_file {str(path)!r} does not exist or is not a file; pass a UTF-8 text file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read data.input_file {str(path)!r} ({err.strerror or err}); "
                        "pass a readable file") from None
    _decode(data, f"data.input_file {str(path)!r}")
    return data


def check_long_enough(split: str, n_tokens: int, block_size: int) -> None:
    if n_tokens <= block_size:
        raise UserError(
            f"the {split} split has {n_tokens} tokens, not more than data.block_size={block_size};"
            " use a longer text or a smaller data.block_size"
        )


@dataclass(frozen=True)
class Source:
    """What prepared data is made from: a local file, known by its bytes' SHA-256, or a URL, known by itself
    (so a prepared URL needs no download to be found)."""

    location: str  # the resolved path of a local file, or the URL
    sha256: str | None = None  # of a local file's bytes; None for a URL

    def dir_name(self, tokenizer: str, val_fraction: float) -> str:
        defining = json.dumps([self.sha256 or self.location, tokenizer, float(val_fraction)])
        return f"{tokenizer}-{sha256_of(defining.encode())[:12]}"

    def made(self, meta: dict) -> bool:
        """Whether `meta` describes data made from this source."""
        return meta["source_sha256"] == self.sha256 if self.sha256 else meta["source"] == self.location


def damage(directory: Path, source: Source, tokenizer: str, val_fraction: float) -> str | None:
    """What is wrong with the prepared data in `directory` ("missing" when there is none); None if whole."""
    if not directory.exists():
        return "missing"
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json missing"
    except OSError as err:
        return f"meta.json unreadable: {err.strerror or err}"
    except ValueError:  # not UTF-8, or not JSON
        return "meta.json is not JSON"
    if not isinstance(meta, dict):
        return "meta.json is not a JSON object"
    if not all(key in meta for key in META_KEYS):
        return f"meta.json lacks {', '.join(key for key in META_KEYS if key not in meta)}"
    if (not isinstance(meta["tokenizer"], dict) or meta["tokenizer"].get("kind") != tokenizer
            or meta["val_fraction"] != val_fraction or not source.made(meta)):
        return "meta.json describes other data"
    for split in SPLITS:
        expected = meta["tokens"].get(split) if isinstance(meta["tokens"], dict) else None
        if not isinstance(expected, int):
            return f"meta.json lacks the {split} token count"
        path = directory / f"{split}.bin"
        if not path.is_file():
            return f"{split}.bin missing"
        size = path.stat().st_size
        if size != expected * TOKEN_DTYPE().itemsize:
            return f"{split}.bin has {size:,} bytes, meta.json says {expected:,} tokens"
    return None


def _move_into_place(tmp: Path, directory: Path, keep_existing: Callable[[], bool]) -> None:
    """Rename the finished `tmp` to `directory`. One already there is kept if `keep_existing()`, else moved
    aside and deleted; if this is interrupted between the two renames, the old one is put back."""
    try:
        os.rename(tmp, directory)
        return
    except OSError:
        if not directory.exists():
            raise
    if keep_existing():  # another process finished the same data first
        return
    aside = tmp.with_suffix(".old")
    try:
        try:
            os.rename(directory, aside)
        except FileNotFoundError:
            pass  # another process moved it aside already
        try:
            os.rename(tmp, directory)
        except OSError:
            if not directory.exists():
                raise
            # another process put its whole copy there in between: that one stays
    finally:
        if aside.exists() and not directory.exists():
            os.rename(aside, directory)
        shutil.rmtree(aside, ignore_errors=True)


def _build(directory: Path, source: Source, data: bytes, tokenizer: str, val_fraction: float, block_size: int,
           keep_existing: Callable[[], bool]) -> None:
    """Split the text (train first, val last), encode both parts and write the directory whole.

    Everything is written into a temporary sibling that is renamed into place; whatever stops it
    (an error, Ctrl+C) leaves no part of it behind. A split of no more than `block_size` tokens is
    refused before anything is written.
    """
    text = _decode(data, f"the text from {source.location}")
    try:
        tok = build_tokenizer(tokenizer, text)
    except ValueError as err:
        raise UserError(str(err)) from None
    if tok.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise UserError(f"a vocabulary of {tok.vocab_size} tokens does not fit uint16 bins; use data.tokenizer=gpt2")
    n_train_chars = int(len(text) * (1 - val_fraction))
    parts = {"train": text[:n_train_chars], "val": text[n_train_chars:]}
    encoded = {split: np.array(tok.encode(part), dtype=TOKEN_DTYPE) for split, part in parts.items()}
    for split, ids in encoded.items():
        check_long_enough(split, len(ids), block_size)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # a hidden sibling of a name no other process uses; mkdir, unlike mkdtemp, honours the umask
    tmp = directory.parent / f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
        for split, ids in encoded.items():
            _write_tokens(tmp / f"{split}.bin", ids)
        meta = {
            "source": source.location,
            "source_bytes": len(data),
            "source_sha256": sha256_of(data),
            "tokenizer": tok.to_meta(),
            "vocab_size": tok.vocab_size,
            "val_fraction": val_fraction,
            "tokens": {split: len(ids) for split, ids in encoded.items()},
        }
        _write_file(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        _move_into_place(tmp, directory, keep_existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for split, ids in encoded.items():
        say(f"{split} has {len(ids):,} tokens")
    say(f"prepared data: {directory}")


def prepare(data_dir: Path, source: Source, read: Callable[[], bytes], tokenizer: str, val_fraction: float,
            block_size: int = 0, force: bool = False) -> Path:
    """The directory of `source`'s data under `data_dir`, written unless it is there and whole.

    Damaged data is rebuilt, saying so in one line; `force` rebuilds whole data too. `read()` gives
    the source's bytes and is called only when something is to be written.
    """
    directory = data_dir / source.dir_name(tokenizer, val_fraction)
    wrong = damage(directory, source, tokenizer, val_fraction)
    if wrong is None and not force:
        return directory
    if wrong not in (None, "missing"):
        say(f"prepared data in {directory} is damaged ({wrong}); rebuilding it")
    data = read()
    try:
        _build(directory, source, data, tokenizer, val_fraction, block_size,
               keep_existing=lambda: not force and damage(directory, source, tokenizer, val_fraction) is None)
    except OSError as err:  # the text was read: this is writing the prepared data
        raise UserError(f"cannot write the prepared data into data.data_dir={data_dir} "
                        f"({err.strerror or err}: {err.filename}); pass a writable data.data_dir") from None
    return directory


def identity_of(meta: dict) -> dict:
    """What prepared data is (source, its hash and size, tokenizer kind, val fraction, tokens), from its
    meta.json, JSON-able: stored in checkpoints, so a resumed run, a sample or an evaluation can tell which
    data a model learned."""
    return {**{key: meta[key] for key in IDENTITY_KEYS}, "tokenizer": meta["tokenizer"]["kind"]}


def prepare_command(source: str, tokenizer: str, val_fraction: float, data_dir: Path | str | None = None) -> str:
    """The scripts/prepare.py command line that prepares the text at `source` (a path or a URL), for messages.

    Without `data_dir` the command names the `text` data group, whose own data_dir it then uses."""
    given = ["data.input_file=null", f"data.url={source}"] if "://" in source else [f"data.input_file={source}"]
    overrides = [*given, f"data.tokenizer={tokenizer}", f"data.val_fraction={val_fraction}"]
    overrides = ["data=text", *overrides] if data_dir is None else [*overrides, f"data.data_dir={data_dir}"]
    return "python scripts/prepare.py " + " ".join(map(shlex.quote, overrides))


def describe_data(identity: dict) -> str:
    """One line naming the data, e.g. `input.txt (sha256 3c1f7a2b9c4d..., 1,115,394 bytes), char tokenizer, 10% val`."""
    source = identity["source"]
    name = PurePosixPath(urlparse(source).path).name if "://" in source else Path(source).name
    return (f"{name} (sha256 {identity['source_sha256'][:12]}..., {identity['source_bytes']:,} bytes), "
            f"{identity['tokenizer']} tokenizer, {identity['val_fraction'] * 100:g}% val")
