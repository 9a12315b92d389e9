"""Files written whole: a reader, or a process killed mid-write, never sees half a file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


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
