"""A corpus -> token shards + metadata, streamed in bounded memory, tokenized in parallel, written whole and
resumable; what prepared data is, for messages and checkpoints. Needs no torch: `scripts/prepare.py` starts
in a moment.

Prepared data is known by what it is made from. Each preparation is a directory of its own under
`data_dir`, `<tokenizer>-<12 hex digits>`, the digits hashing the source (data/sources.py: the SHA-256 of
a local file's bytes or of every file's, a URL, a dataset's name), the tokenizer and the validation fraction.
It holds the shards of each split (data/shards.py) and `meta.json`. It is written in a hidden sibling,
`.<name>.partial`, and renamed into place, so it is there complete or not at all, and a different text or
tokenizer never touches it; a preparation stopped on the way keeps its whole shards there and the same
command goes on from them. Batches are drawn from the shards by data/windows.py, for the LightningDataModule
in data/datamodule.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shlex
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np

from nanogpt_lightning.console import say
from nanogpt_lightning.data.shards import PROGRESS, SHARD_TOKENS, ShardWriter, dtype_of, shards_of, token_dtype
from nanogpt_lightning.data.sources import PIECE_CHARS, Corpus, Source, sha256_of
from nanogpt_lightning.data.tokenizer import EOT_TEXT, Tokenizer, build_tokenizer
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.files import write_whole
from nanogpt_lightning.metrics import SPLITS

__all__ = ["Source", "sha256_of"]  # re-exported: tools/evaluate.py finds prepared data by them

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TOKEN_DTYPE = np.uint16  # of data prepared before meta.json recorded its dtype (and of most data since)
# what a meta.json must hold, and the part of it that identifies the data (stored in checkpoints)
META_KEYS = ("source", "source_bytes", "source_sha256", "tokenizer", "vocab_size", "val_fraction", "tokens")
IDENTITY_KEYS = ("source", "source_sha256", "source_bytes", "tokenizer", "val_fraction", "tokens")
PROGRESS_EVERY_S = 30.0  # a progress line this often when stdout is not a terminal


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanogpt-lightning"


def download(url: str, cache_dir: Path, sha256: str | None = None) -> Path:
    """The text at `url`, fetched once into `cache_dir`; checked against `sha256` when it is known."""
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
    if sha256 is not None and sha256_of(body) != sha256:
        raise UserError(f"the text downloaded from {url} has SHA-256 {sha256_of(body)}, not the expected {sha256} "
                        "(data.sha256); pass a good local copy with data.input_file=PATH")
    write_whole(target, body)
    return target


def check_long_enough(split: str, n_tokens: int, block_size: int) -> None:
    if n_tokens <= block_size:
        raise UserError(
            f"the {split} split has {n_tokens} tokens, not more than data.block_size={block_size};"
            " use a longer text or a smaller data.block_size"
        )


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
        try:
            shards = shards_of(meta, split)
            itemsize = dtype_of(meta).itemsize
        except (KeyError, TypeError, ValueError):
            return f"meta.json lists no {split} shards"
        if sum(tokens for _, tokens in shards) != expected:
            return f"the {split} shards do not add up to {expected:,} tokens"
        for name, tokens in shards:
            path = directory / name
            if not path.is_file():
                return f"{name} missing"
            size = path.stat().st_size
            if size != tokens * itemsize:
                what = f"{expected:,} tokens" if len(shards) == 1 else f"{tokens:,} tokens in it"
                return f"{name} has {size:,} bytes, meta.json says {what}"
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


def encode_unit(tok: Tokenizer, unit: list[tuple[str, bool]]) -> tuple[np.ndarray, int]:
    """The tokens of the pieces in `unit`, an end-of-text token after each that ends a document; and their
    UTF-8 bytes. Run in a thread: tiktoken and numpy release the GIL while they work."""
    n_bytes = sum(len(piece.encode("utf-8")) for piece, _ in unit)
    eot = getattr(tok, "eot_token", None)
    if eot is not None and tok.to_meta()["kind"] == "gpt2" and not any(EOT_TEXT in piece for piece, _ in unit):
        # one call for many small documents: tiktoken encodes the text between special tokens on its own
        return tok.encode_array("".join(piece + EOT_TEXT * end for piece, end in unit), eot_allowed=True), n_bytes
    parts = []
    for piece, end in unit:
        parts.append(tok.encode_array(piece))
        if end and eot is not None:
            parts.append(np.array([eot], dtype=np.uint32))
    return np.concatenate(parts), n_bytes


def units_of(pieces: Iterator[tuple[str, str, bool]], size: int = PIECE_CHARS):
    """The corpus's pieces grouped into units of about `size` characters, each of one split: what one
    tokenizer thread encodes at a time, and how far a resumed preparation skips."""
    unit, split, chars = [], None, 0
    for piece_split, piece, end in pieces:
        if unit and (piece_split != split or chars >= size):
            yield split, unit
            unit, chars = [], 0
        split = piece_split
        unit.append((piece, end))
        chars += len(piece)
    if unit:
        yield split, unit


class Progress:
    """Documents, tokens, MB/s and time left: a bar on a terminal, a whole line every PROGRESS_EVERY_S otherwise."""

    def __init__(self, total_bytes: int | None, done: dict):
        self.total = total_bytes
        self.done = done
        self.start = time.monotonic()
        self.last_line = self.start
        self.start_bytes = done["bytes"]
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, initial=done["bytes"], unit="B", unit_scale=True, file=sys.stdout,
                            desc="preparing", dynamic_ncols=True)

    def update(self, n_bytes: int) -> None:
        documents = sum(self.done["documents"].values())
        if self.bar is not None:
            self.bar.set_postfix_str(f"{documents:,} documents, {self.done['tokens']:,} tokens", refresh=False)
            self.bar.update(n_bytes)
            return
        now = time.monotonic()
        if now - self.last_line < PROGRESS_EVERY_S:
            return
        self.last_line = now
        rate = (self.done["bytes"] - self.start_bytes) / (now - self.start)
        where = f"{self.done['bytes'] / 1e6:,.0f} MB"
        if self.total:
            left = (self.total - self.done["bytes"]) / rate if rate > 0 else 0
            where += (f" of {self.total / 1e6:,.0f} MB ({self.done['bytes'] / self.total:.0%}), "
                      f"{time.strftime('%H:%M:%S', time.gmtime(left))} left")
        say(f"preparing: {where}, {documents:,} documents, {self.done['tokens']:,} tokens, {rate / 1e6:.1f} MB/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _encode_into(writer: ShardWriter, corpus: Corpus, tok: Tokenizer, num_proc: int) -> None:
    """Encode the corpus in units on `num_proc` threads, at most two units each in flight (memory stays
    bounded), writing their tokens in order; units written before (a resumed preparation) are skipped."""
    done = writer.state
    progress = Progress(corpus.total_bytes, done)

    def write(split: str, unit: list[tuple[str, bool]], encoded) -> None:
        ids, n_bytes = encoded.result()
        writer.add(split, ids)
        done["units"] += 1
        done["documents"][split] += sum(end for _, end in unit)
        done["tokens"] += len(ids)
        done["bytes"] += n_bytes
        if writer.full():
            writer.close_shard()  # records `done` with it
        progress.update(n_bytes)

    skip = done["units"]
    in_flight = deque()
    try:
        with ThreadPoolExecutor(num_proc) as pool:
            # a unit is never more characters than a shard's tokens: small shards are cut near their size too
            for index, (split, unit) in enumerate(units_of(corpus.pieces(), min(PIECE_CHARS, writer.shard_tokens))):
                if index < skip:
                    continue
                in_flight.append((split, unit, pool.submit(encode_unit, tok, unit)))
                if len(in_flight) >= 2 * num_proc:
                    write(*in_flight.popleft())
            while in_flight:
                write(*in_flight.popleft())
    finally:
        progress.close()


def _claim_work_dir(directory: Path) -> tuple[Path, int | None]:
    """Where to write `directory`'s data: its resumable `.<name>.partial`, locked for this process; or, when
    another process holds that, a private hidden sibling (two preparations at once both end whole)."""
    lock = os.open(directory.parent / f".{directory.name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        # a hidden sibling of a name no other process uses; mkdir, unlike mkdtemp, honours the umask
        tmp = directory.parent / f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir()
        return tmp, None
    work = directory.parent / f".{directory.name}.partial"
    work.mkdir(exist_ok=True)
    return work, lock


def _release(directory: Path, lock: int | None) -> None:
    if lock is not None:
        (directory.parent / f".{directory.name}.lock").unlink(missing_ok=True)
        os.close(lock)


def _build(directory: Path, source: Source, corpus: Corpus, tokenizer: str, val_fraction: float, block_size: int,
           num_proc: int, shard_tokens: int, keep_existing: Callable[[], bool]) -> None:
    """Encode the corpus into shards in the work directory and rename it into place with its meta.json.

    A split of no more than `block_size` tokens is refused; whatever stops it (an error, Ctrl+C) leaves
    nothing in place, and only whole shards (the same command goes on from them) in `.<name>.partial`.
    """
    try:
        tok = build_tokenizer(tokenizer, (piece for _, piece, _ in corpus.pieces()), eot=corpus.documents)
    except ValueError as err:
        raise UserError(str(err)) from None
    directory.parent.mkdir(parents=True, exist_ok=True)
    work, lock = _claim_work_dir(directory)
    dtype = token_dtype(tok.vocab_size)
    key = {"source": source.location, "sha256": source.sha256, "options": source.options,
           "tokenizer": tok.to_meta(), "val_fraction": val_fraction, "piece_chars": PIECE_CHARS}
    writer = None
    try:
        writer = ShardWriter(work, key, shard_tokens, dtype)
        if writer.state:
            n_shards = sum(map(len, writer.shards.values()))
            say(f"resuming an interrupted preparation: {n_shards} whole shard(s), {writer.whole_tokens:,} tokens "
                f"kept in {work}")
        else:
            writer.state = {"units": 0, "documents": dict.fromkeys(SPLITS, 0), "tokens": 0, "bytes": 0}
        _encode_into(writer, corpus, tok, num_proc)
        shards = writer.finish()
        tokens = {split: sum(n for _, n in shards[split]) for split in SPLITS}
        for split in SPLITS:
            check_long_enough(split, tokens[split], block_size)
        meta = {
            "source": source.location,
            "source_bytes": corpus.total_bytes or writer.state["bytes"],
            "source_sha256": corpus.source.sha256,  # of the bytes prepared, also when known by a URL
            **({"source_options": source.options} if source.options else {}),
            "tokenizer": tok.to_meta(),
            "vocab_size": tok.vocab_size,
            "val_fraction": val_fraction,
            "tokens": tokens,
            "dtype": dtype.name,
            "shards": shards,
            **({"documents": writer.state["documents"]} if corpus.documents else {}),
        }
        with open(work / "meta.json", "wb") as f:
            f.write(json.dumps(meta, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(work, directory, keep_existing)
        shutil.rmtree(work, ignore_errors=True)  # there when the same data, whole, was kept in its place
    except BaseException as stop:
        if writer is not None:
            writer.abandon()
        # whole shards recorded (progress.json) are kept for the same command to go on from, unless refused
        if lock is not None and (work / PROGRESS).exists() and not isinstance(stop, UserError):
            say(f"stopped: {writer.whole_tokens:,} tokens in whole shards kept in {work}; "
                "the same command goes on from there", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        _release(directory, lock)
    for split in SPLITS:
        say(f"{split} has {tokens[split]:,} tokens")
    say(f"prepared data: {directory}")


def prepare(data_dir: Path, source: Source, open_corpus: Callable[[], Corpus], tokenizer: str, val_fraction: float,
            block_size: int = 0, force: bool = False, num_proc: int | None = None,
            shard_tokens: int = SHARD_TOKENS) -> Path:
    """The directory of `source`'s data under `data_dir`, written unless it is there and whole.

    Damaged data is rebuilt, saying so in one line; `force` rebuilds whole data too. `open_corpus()` gives
    the documents and is called only when something is to be written; `num_proc` threads tokenize (None:
    one per core this process may use).
    """
    directory = data_dir / source.dir_name(tokenizer, val_fraction)
    wrong = damage(directory, source, tokenizer, val_fraction)
    if wrong is None and not force:
        return directory
    if wrong not in (None, "missing"):
        say(f"prepared data in {directory} is damaged ({wrong}); rebuilding it")
    corpus = open_corpus()
    num_proc = num_proc or len(os.sched_getaffinity(0))
    created = not data_dir.exists()
    try:
        _build(directory, source, corpus, tokenizer, val_fraction, block_size, num_proc, shard_tokens,
               keep_existing=lambda: not force and damage(directory, source, tokenizer, val_fraction) is None)
    except OSError as err:  # the text was read: this is writing the prepared data
        raise UserError(f"cannot write the prepared data into data.data_dir={data_dir} "
                        f"({err.strerror or err}: {err.filename}); pass a writable data.data_dir") from None
    except UserError:
        if created and data_dir.is_dir() and not any(data_dir.iterdir()):
            data_dir.rmdir()  # refused: leave no trace
        raise
    return directory


def identity_of(meta: dict) -> dict:
    """What prepared data is (source, its hash and size, tokenizer kind, val fraction, tokens, and the source's
    options when it has some), from its meta.json, JSON-able: stored in checkpoints, so a resumed run, a sample
    or an evaluation can tell which data a model learned."""
    identity = {**{key: meta[key] for key in IDENTITY_KEYS}, "tokenizer": meta["tokenizer"]["kind"]}
    return {**identity, "source_options": meta["source_options"]} if "source_options" in meta else identity


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
    sha = f"sha256 {identity['source_sha256'][:12]}..., " if identity["source_sha256"] else ""
    val = "its own val split" if identity["val_fraction"] is None else f"{identity['val_fraction'] * 100:g}% val"
    return f"{name} ({sha}{identity['source_bytes']:,} bytes), {identity['tokenizer']} tokenizer, {val}"
