"""How checkpoints are written: whole or not at all (Lightning's checkpoint plugin, conf/trainer/default.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nanogpt_lightning.errors import UserError
from nanogpt_lightning.files import partial_path, written_whole


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint beside its target (`.<name>.<pid>.partial`), then rename it into place.

    A process killed mid-write leaves the previous file whole (a rename is atomic on one filesystem); its
    partial file is removed by the next run's LastCheckpoint (remove_stale_partial_files), or at once by a
    second Ctrl+C (remove_partial_files).
    """

    _writing: set[Path] = set()  # partial files this process is writing now

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        partial = partial_path(path)
        self._writing.add(partial)
        try:
            with written_whole(path) as partial, open(partial, "wb") as f:  # the file closes before the rename
                torch.save(checkpoint, f)
        except OSError as err:  # a full disk, a quota, a directory made read-only
            kept = f"; the previous {path.name} is whole" if path.exists() else ""
            raise UserError(f"cannot write the checkpoint {path} ({err.strerror or err}){kept}; free some space "
                            "or make the directory writable, then resume") from None
        finally:
            self._writing.discard(partial)

    @classmethod
    def remove_partial_files(cls) -> None:
        for partial in list(cls._writing):
            partial.unlink(missing_ok=True)

    @staticmethod
    def remove_stale_partial_files(directory: Path) -> None:
        """Partial files in `directory` whose writing process is gone (killed mid-save)."""
        for partial in directory.glob(".*.partial"):
            pid = partial.name.split(".")[-2]
            if pid.isdigit() and not _process_alive(int(pid)):
                partial.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
