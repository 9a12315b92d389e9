"""One run per run directory: refuse a directory that cannot be written, holds another run, or is in use.

Light on purpose (no torch, no Lightning): Hydra runs RunDirCheck before the run's code is imported, so a
refused directory costs a moment, not the seconds of loading PyTorch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import sys
from pathlib import Path

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from nanogpt_lightning.config import check_settings, text
from nanogpt_lightning.console import say
from nanogpt_lightning.errors import SettingError, UserError
from nanogpt_lightning.train.settings import TRAIN_RULES


def _unwritable_reason(directory: Path) -> str | None:
    """Why `directory` cannot be created or written, or None when it can."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def previous_run(run_dir: Path) -> str | None:
    """What of an earlier training run `run_dir` holds (its checkpoints or curves), or None."""
    for name in ("checkpoints", "tensorboard"):
        if (run_dir / name).is_dir() and any((run_dir / name).iterdir()):
            return f"{name}/"
    return None


def check_fresh_run_dir(run_dir: Path, ckpt_path: str | None) -> None:
    """A run directory holds one run: a new run may not write into another's, only resume it in place.

    The error names hydra.run.dir; a sweep's job names hydra.sweep.dir (errors.naming)."""
    found = previous_run(run_dir)
    if found is None:
        return
    if ckpt_path is not None and str(ckpt_path) != "latest":
        resumed = Path(ckpt_path).expanduser().absolute()
        if resumed == run_dir or run_dir in resumed.parents:
            return  # resuming this run in place
    raise SettingError(lambda key="hydra.run.dir": f"{run_dir} already holds a run ({found}); resume it with "
                       f"ckpt_path={run_dir}, or pass another {key}=DIR")


def is_first_process() -> bool:
    """Not one of the other processes of a multi-process run (they share rank zero's run directory)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


class RunDirCheck(HydraCallback):
    """Hydra callback, before Hydra writes into the run directory: refuse, in one line, a directory that
    cannot be written, that holds another run, or in which another process is training now.

    The first process of a run holds an exclusive lock on `<run dir>/.lock` until it ends. Whether the
    directory was made for this run is remembered: a run that fails before its first checkpoint removes it
    (removed_unless_saved).
    """

    created: Path | None = None  # the run directory, when this process made it
    _lock = None  # the open lock file, held until the process ends

    def _checked_dir(self, config: DictConfig, key: str) -> Path:
        """The directory `key` names, refused in one line unless it resolves and can be written."""
        try:
            directory = Path(check_settings(config, {key: text("DIR")})[key]).expanduser().absolute()
        except UserError as err:  # e.g. ${oc.env:UNSET}: Hydra would warn, then fail in its own traceback
            _exit_with_error(str(err))
        reason = _unwritable_reason(directory)
        if reason is not None:
            _exit_with_error(f"cannot write the run directory {directory} ({reason}); pass a writable {key}=DIR")
        return directory

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = self._checked_dir(config, "hydra.run.dir")
        if not is_first_process():
            return
        try:
            ckpt_path = check_settings(config, {"ckpt_path": TRAIN_RULES["ckpt_path"]}).get("ckpt_path")
            check_fresh_run_dir(run_dir, ckpt_path)
        except UserError as err:
            _exit_with_error(str(err))
        if not run_dir.exists():
            run_dir.mkdir(parents=True)
            RunDirCheck.created = run_dir
        RunDirCheck._lock = open(run_dir / ".lock", "w")
        try:
            fcntl.flock(RunDirCheck._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _exit_with_error(f"another process is training in {run_dir} now; wait for it to end, "
                             "or pass another hydra.run.dir=DIR")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._checked_dir(config, "hydra.sweep.dir")


def _exit_with_error(message: str) -> None:
    say(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _stop_on_sigterm(signum, frame):
    print("\nstopped by SIGTERM before training began; nothing saved", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def removed_unless_saved():
    """Around a training script's run: when it ends in an error, Ctrl+C or SIGTERM before it wrote a checkpoint,
    remove the run directory this process made for it (RunDirCheck), `.lock`, `.hydra/` and `train.log`
    included, so the same command can run again. Until training takes SIGTERM (callbacks.GracefulInterrupt),
    SIGTERM ends the script through here with status 143, as Ctrl+C does with 130 (errors.quiet_ctrl_c)."""
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        yield
    except BaseException as stop:
        run_dir = RunDirCheck.created
        failed = not isinstance(stop, SystemExit) or stop.code not in (0, None)
        if failed and run_dir is not None and not any((run_dir / "checkpoints").glob("*.ckpt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
