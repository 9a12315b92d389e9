"""Where text comes from: a file, a folder, a glob, or a Hugging Face dataset, read as a stream of pieces of
documents, never whole; and what a corpus is (its `Source`, the identity of prepared data).

A corpus yields `(split, piece, ends_document)`: pieces of about `PIECE_CHARS` characters, cut only where
GPT-2's pre-tokenizer would cut anyway, so encoding the pieces gives the tokens of the whole text. One plain
text file named alone is prepared as it always was: one text, split by characters (train first, val last),
no end-of-text token. Anything else is documents (a file of a folder, a line of JSON Lines, a row of Parquet,
an example of a dataset), each ended by the tokenizer's end-of-text token; validation is the last
`val_fraction` of them, or a dataset's own validation split.

Every file is hashed (SHA-256), checked to be UTF-8 and counted once; the result is remembered in the cache
keyed by (path, size, mtime, inode), so finding prepared data again reads no file.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanogpt_lightning.errors import UserError, first_line
from nanogpt_lightning.files import write_whole

PIECE_CHARS = 1 << 20  # characters per piece: about what a tokenizer thread takes at a time
READ_BYTES = 1 << 20
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")  # in a folder: one document per file
LINE_SUFFIXES = (".jsonl", ".json")  # one document per line, its text in data.text_field
PARQUET_SUFFIXES = (".parquet",)
UTF8_BOM = codecs.BOM_UTF8


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Source:
    """What prepared data is made from: a local file or folder known by its bytes' SHA-256, or a URL or a
    dataset known by its name (so prepared data from the network needs no download to be found).

    `options` (the text field of JSON or Parquet, a dataset's subset, split and revision) define the data
    too; one plain text file has none, so its directory name and identity are what they always were."""

    location: str  # the resolved path of a file, folder or glob; a URL; `hf:NAME` for a dataset
    sha256: str | None = None  # of a file's bytes, or over every file's (name, SHA-256); None when named
    options: dict = field(default_factory=dict)

    def dir_name(self, tokenizer: str, val_fraction: float) -> str:
        defining = [self.sha256 or self.location, tokenizer, float(val_fraction)]
        if self.options:
            defining.append(self.options)
        return f"{tokenizer}-{sha256_of(json.dumps(defining, sort_keys=True).encode())[:12]}"

    def made(self, meta: dict) -> bool:
        """Whether `meta` describes data made from this source."""
        same = meta["source_sha256"] == self.sha256 if self.sha256 else meta["source"] == self.location
        return same and meta.get("source_options", {}) == self.options


def _not_utf16(path: Path, head: bytes) -> None:
    """Refuse UTF-16 text (a byte-order mark, or NUL in every other byte) naming the conversion."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "UTF-16"
    elif len(head) >= 16 and head.count(0) > len(head) // 4:
        encoding = "UTF-16LE" if head[1::2].count(0) > head[0::2].count(0) else "UTF-16BE"
    else:
        return
    raise UserError(f"{path} looks like {encoding} text, not UTF-8; convert it: iconv -f {encoding} -t UTF-8 "
                    f"{shlex.quote(str(path))} > {shlex.quote(str(path) + '.utf8')}")


def _not_utf8(path: Path, offset: int) -> UserError:
    return UserError(f"{path} is not UTF-8 text (byte {offset:,} is not); convert it (iconv -f LATIN1 -t UTF-8 "
                     f"{shlex.quote(str(path))} > {shlex.quote(str(path) + '.utf8')}) or leave it out of "
                     "data.input_file")


def read_decoded(path: Path, hasher=None) -> Iterator[str]:
    """The text of the UTF-8 file `path` in blocks (a leading BOM dropped), feeding its bytes to `hasher`;
    refused in one line if it is UTF-16 or not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BYTES):
                if hasher is not None:
                    hasher.update(block)
                if offset == 0:
                    _not_utf16(path, block[:4096])
                    if block.startswith(UTF8_BOM):
                        block, offset = block[len(UTF8_BOM):], len(UTF8_BOM)
                try:
                    text = decoder.decode(block)
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, offset + err.start) from None
                offset += len(block)
                if text:
                    yield text
            unfinished = len(decoder.getstate()[0])  # the bytes of a character cut off by the end
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset - unfinished + err.start) from None
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); pass readable files") from None


@dataclass(frozen=True)
class FileInfo:
    """What reading a file once tells: its SHA-256 and size, and its characters and lines (text files)."""

    sha256: str
    bytes: int
    chars: int
    lines: int


class FileInfoCache:
    """FileInfo of files seen before, keyed by (path, size, mtime, inode): a file is read for it once."""

    def __init__(self, path: Path | None):
        self.path = path
        self._known: dict | None = None
        self._changed = False

    def _entries(self) -> dict:
        if self._known is None:
            try:
                self._known = json.loads(self.path.read_text()) if self.path is not None else {}
            except (OSError, ValueError):
                self._known = {}
        return self._known

    def info(self, path: Path, kind: str = "text") -> FileInfo:
        """The FileInfo of a file of `kind`: text (also JSON Lines), parquet or binary (any bytes)."""
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
        known = self._entries().get(key)
        if known is None:
            known = {"text": _text_info, "lines": _text_info, "parquet": _parquet_info, "binary": _binary_info}[kind](
                path).__dict__
            self._entries()[key] = known
            self._changed = True
        return FileInfo(**known)

    def save(self) -> None:
        if self._changed and self.path is not None:
            try:
                write_whole(self.path, json.dumps(self._entries()).encode())
            except OSError:
                pass  # a cache: without it files are read again next time
            self._changed = False


def _text_info(path: Path) -> FileInfo:
    hasher = hashlib.sha256()
    chars = lines = 0
    last = ""
    for text in read_decoded(path, hasher):
        chars += len(text)
        lines += text.count("\n")
        last = text[-1]
    if chars == 0:
        raise UserError(f"{path} is empty; pass a file with some text in it")
    size = path.stat().st_size
    return FileInfo(hasher.hexdigest(), size, chars, lines + (last != "\n"))


def _binary_info(path: Path) -> FileInfo:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            hasher.update(block)
    return FileInfo(hasher.hexdigest(), path.stat().st_size, 0, 0)


def _parquet_info(path: Path) -> FileInfo:
    return FileInfo(**{**_binary_info(path).__dict__, "lines": _parquet_file(path).metadata.num_rows})


def files_sha256(base: Path, files: list[Path], infos: list[FileInfo]) -> str:
    """The SHA-256 of several files: over each one's name (relative to `base`) and SHA-256, in order."""
    return sha256_of(json.dumps([[p.relative_to(base).as_posix(), info.sha256] for p, info in zip(files, infos)])
                     .encode())


def folder_sha256(folder: Path, cache: FileInfoCache) -> str:
    """files_sha256 of every file under `folder` (a saved dataset), whatever they hold."""
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    sha256 = files_sha256(folder, files, [cache.info(p, "binary") for p in files])
    cache.save()
    return sha256


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install -e '.[parquet]'") from None
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # pyarrow's errors (ArrowInvalid is a ValueError): damaged or foreign
        raise UserError(f"cannot read {path} as Parquet ({first_line(err)}); pass a Parquet file") from None


def cut(text: str) -> int:
    """The last place where `text` can be cut without changing its tokens: before a lone space or newline
    between two non-space characters (GPT-2's pre-tokenizer never joins across it); 0 if there is none."""
    end = len(text) - 1
    while end > 0:
        i = max(text.rfind(" ", 0, end), text.rfind("\n", 0, end))
        if i <= 0:
            return 0
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        end = i
    return 0


def pieces_of(blocks: Iterator[str], size: int = PIECE_CHARS) -> Iterator[str]:
    """The text of `blocks` again, in pieces of about `size` characters cut only where `cut` allows."""
    pending = ""
    for block in blocks:
        pending += block
        while len(pending) >= size:
            at = cut(pending[:2 * size]) or cut(pending)
            if at == 0:
                break  # no place to cut yet: read on
            yield pending[:at]
            pending = pending[at:]
    if pending:
        yield pending


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return "lines" if suffix in LINE_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"


def _listed(pattern: str) -> tuple[Path, list[Path]]:
    """The base folder and the files that `data.input_file` names (a folder's text files, recursively, or
    a glob's matches), in a stable order; refused in one line when there are none."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        suffixes = TEXT_SUFFIXES + LINE_SUFFIXES + PARQUET_SUFFIXES
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise UserError(f"data.input_file={pattern} is a folder with no text files ({', '.join(suffixes)}); "
                            "pass a folder, file or glob of UTF-8 text")
        return path, files
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not matches:
        raise UserError(f"data.input_file={pattern} does not exist or names no file; pass a UTF-8 text file, "
                        "a folder of them or a glob")
    return Path(os.path.commonpath([p.parent for p in matches])), matches


class Corpus:
    """The documents to prepare and their Source; `pieces()` streams them, split into train and val."""

    source: Source
    documents: bool  # whether each document ends with an end-of-text token
    total_bytes: int | None  # for the progress bar; None when not known

    def pieces(self) -> Iterator[tuple[str, str, bool]]:
        raise NotImplementedError


class TextFile(Corpus):
    """One plain text file: split by characters, train first (as nanoGPT does), no end-of-text token."""

    documents = False

    def __init__(self, path: Path, info: FileInfo, val_fraction: float):
        self.path = path
        self.info = info
        self.source = Source(str(path.resolve()), info.sha256)
        self.total_bytes = info.bytes
        self.n_train_chars = int(info.chars * (1 - val_fraction))

    def pieces(self) -> Iterator[tuple[str, str, bool]]:
        hasher = hashlib.sha256()
        seen = 0
        for piece in pieces_of(read_decoded(self.path, hasher)):
            if seen < self.n_train_chars < seen + len(piece):
                at = self.n_train_chars - seen
                yield "train", piece[:at], False
                yield "val", piece[at:], False
            else:
                yield "train" if seen < self.n_train_chars else "val", piece, False
            seen += len(piece)
        if hasher.hexdigest() != self.info.sha256:
            raise UserError(f"data.input_file {str(self.path)!r} changed while it was being prepared; run again")


class Files(Corpus):
    """Documents from files: a plain text file is one, a JSON Lines file one per line, a Parquet file one per
    row; the last `val_fraction` of them are validation."""

    documents = True

    def __init__(self, pattern: str, cache: FileInfoCache, val_fraction: float, text_field: str):
        base, self.files = _listed(pattern)
        self.text_field = text_field
        self.infos = [cache.info(p, _kind(p)) for p in self.files]
        cache.save()
        if len(self.files) == 1 and _kind(self.files[0]) != "text":  # its bytes, wherever it lies (a text file
            sha256 = self.infos[0].sha256  # alone is a TextFile: one in a folder is a document, named with it)
        else:
            sha256 = files_sha256(base, self.files, self.infos)
        needs_field = any(_kind(p) != "text" for p in self.files)
        location = str(Path(pattern).expanduser().resolve()) if "*" not in pattern else pattern
        self.source = Source(location, sha256, {"text_field": text_field} if needs_field else {})
        self.total_bytes = sum(info.bytes for info in self.infos)
        total = sum(1 if _kind(p) == "text" else info.lines for p, info in zip(self.files, self.infos))
        self.n_train = int(total * (1 - val_fraction))
        if self.n_train < 1 or self.n_train == total:
            raise UserError(f"data.input_file={pattern} holds {total} document(s), too few for a train and a "
                            f"validation split at data.val_fraction={val_fraction}; add documents")

    def _documents(self, path: Path, info: FileInfo) -> Iterator[Iterator[str] | None]:
        """The documents of one file, each as blocks of text (None for a blank line: it counts, holds none)."""
        kind = _kind(path)
        if kind == "text":
            hasher = hashlib.sha256()
            yield read_decoded(path, hasher)
            if hasher.hexdigest() != info.sha256:
                raise UserError(f"{path} changed while it was being prepared; run again")
        else:
            for text in (_json_lines if kind == "lines" else _parquet_rows)(path, self.text_field):
                yield iter([text]) if text else None

    def pieces(self) -> Iterator[tuple[str, str, bool]]:
        index = 0
        for path, info in zip(self.files, self.infos):
            for blocks in self._documents(path, info):
                split = "train" if index < self.n_train else "val"
                index += 1
                if blocks is not None:
                    yield from document_pieces(split, blocks)


def document_pieces(split: str, blocks: Iterator[str]) -> Iterator[tuple[str, str, bool]]:
    """One document (its text in `blocks`) as pieces, the last one marked as its end; an empty one gives none."""
    previous = None
    for piece in pieces_of(blocks):
        if previous is not None:
            yield split, previous, False
        previous = piece
    if previous is not None:
        yield split, previous, True


def _json_lines(path: Path, text_field: str) -> Iterator[str | None]:
    line_number = 0
    pending = ""
    for block in read_decoded(path):
        lines = (pending + block).split("\n")
        pending = lines.pop()
        for line in lines:
            line_number += 1
            yield _json_text(path, line_number, line, text_field)
    if pending:
        yield _json_text(path, line_number + 1, pending, text_field)


def _json_text(path: Path, line_number: int, line: str, text_field: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        raise UserError(f"{path}:{line_number} is not a JSON object; pass JSON Lines, one object per line") from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise UserError(f"{path}:{line_number} has no text field {text_field!r}; name the field holding the text "
                        "with data.text_field=NAME")
    return text


def _parquet_rows(path: Path, text_field: str) -> Iterator[str | None]:
    parquet = _parquet_file(path)
    if text_field not in parquet.schema_arrow.names:
        raise UserError(f"{path} has no column {text_field!r} (it has {', '.join(parquet.schema_arrow.names)}); "
                        "name the column holding the text with data.text_field=NAME")
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        yield from batch.column(0).to_pylist()


def open_files(input_file: str, val_fraction: float, text_field: str, cache_dir: Path | None) -> Corpus:
    """The corpus that `data.input_file` names: one plain text file, or documents from files."""
    cache = FileInfoCache(cache_dir / "file-info.json" if cache_dir is not None else None)
    path = Path(input_file).expanduser()
    if path.is_file() and _kind(path) == "text":
        corpus = TextFile(path, cache.info(path), val_fraction)
        cache.save()
        return corpus
    if path.exists() and not path.is_dir() and not path.is_file():
        raise UserError(f"data.input_file {input_file!r} is not a regular file; pass a UTF-8 text file")
    return Files(input_file, cache, val_fraction, text_field)
