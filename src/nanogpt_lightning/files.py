"""Files written whole: a reader, or a process killed mid-write, never sees half a file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from nanogpt_lightning.errors import UserError


def partial_path(path: Path) -> Path:
    """The hidden sibling a file is written into before it is renamed onto `path`: `.<name>.<pid>.partial`
    (the pid keeps processes writing the same file apart, and tells whether the writer is still alive)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """Yield the partial file to write `path` through; when the block ends it is flushed to disk and renamed
    onto `path` (atomic on one filesystem), so `path` holds the old bytes or the new ones, never a mix.
    Whatever stops the block (an error, Ctrl+C) removes the partial file and leaves `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        yield partial
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the name points at them (a power cut keeps either file)
        finally:
            os.close(fd)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_whole(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole (see written_whole)."""
    with written_whole(path) as partial:
        partial.write_bytes(data)


def read_user_text(path: Path, what: str, remedy: str) -> str:
    """The UTF-8 text of a file the user named (`what`: "the prompt file"), refused in one line ending in
    `remedy` (how to pass one) when it is not a regular file (a FIFO or a device would block or never end) or
    cannot be read."""
    if path.exists() and not path.is_file():
        raise UserError(f"{what} {path} is not a regular file; {remedy}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {what} {path} ({err.__class__.__name__}); {remedy}") from None

