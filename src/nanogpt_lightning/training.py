"""Build a training run from a composed Hydra config and run it (the body of scripts/train.py)."""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shlex
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from nanogpt_lightning.checkpoints import resume_path
from nanogpt_lightning.config import validate_train_config
from nanogpt_lightning.console import say
from nanogpt_lightning.devices import pick_device
from nanogpt_lightning.errors import TrainingInterrupted, UserError
from nanogpt_lightning.metrics import EVAL_LOSS_TAGS
from nanogpt_lightning.module import GPTModule

try:  # private to Lightning: see check_no_script_relaunch_in_sweep
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
except ImportError:
    _SubprocessScriptLauncher = None

# the settings that shape a run's result (groups: all their keys); a resumed run must repeat them, except these
RESULT_SETTINGS = ("data.tokenizer", "data.val_fraction", "data.block_size", "data.batch_size", "model", "module",
                   "optimizer", "scheduler", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
                   "trainer.precision", "trainer.max_steps", "seed")
RESUMABLE_CHANGES = ("trainer.max_steps",)  # a resumed run may train further
_ABSENT = object()


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    try:
        return instantiate(cfg.data)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):  # a data.* setting refused: the one line, not Hydra's wrapping
            raise err.__cause__ from None
        raise


def run_settings(cfg: DictConfig) -> dict:
    """The settings that shape a run's result, flat (`optimizer.lr`): its TensorBoard HPARAMS row, and what a
    resumed run must repeat (RESUMABLE_CHANGES aside). Groups give all their keys but `_target_`/`_partial_`."""
    settings = {}
    for key in RESULT_SETTINGS:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if isinstance(value, DictConfig):
            settings |= {f"{key}.{k}": v for k, v in OmegaConf.to_container(value, resolve=True).items()
                         if not k.startswith("_")}
        elif value is not _ABSENT:
            settings[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    return settings


def build_module(cfg: DictConfig, datamodule) -> GPTModule:
    """The GPT sized by the data: block size and vocabulary come from the data module, never the config."""
    try:
        model_config = instantiate(cfg.model)(block_size=datamodule.block_size, vocab_size=datamodule.vocab_size)
    except ValueError as err:
        raise UserError(str(err)) from None
    module = instantiate(cfg.module)(model_config, datamodule.meta["tokenizer"],
                                     optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler),
                                     data=datamodule.identity, run_settings=run_settings(cfg))
    try:
        module.configure_optimizers()  # a dry run: bad optimizer.* or scheduler.* settings fail here, not mid-fit
    except ValueError as err:
        raise UserError(str(err)) from None
    return module


def build_trainer(cfg: DictConfig, **kwargs) -> L.Trainer:
    """The Trainer of `cfg.trainer`; a device that is not here, or settings Lightning refuses: one line."""
    try:
        return instantiate(cfg.trainer, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if not isinstance(cause, MisconfigurationException):
            raise
        accelerator = cfg.trainer.get("accelerator")
        if accelerator in ("cuda", "mps", "gpu"):
            pick_device(accelerator, key="trainer.accelerator")  # the one line that says what is here
        raise UserError(f"trainer settings: {(str(cause).splitlines() or [''])[0]}") from None


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


def check_fresh_run_dir(run_dir: Path, ckpt_path: str | None, key: str) -> None:
    """A run directory holds one run: a new run may not write into another's, only resume it in place."""
    found = previous_run(run_dir)
    if found is None:
        return
    if ckpt_path is not None and str(ckpt_path) != "latest":
        resumed = Path(ckpt_path).expanduser().absolute()
        if resumed == run_dir or run_dir in resumed.parents:
            return  # resuming this run in place
    raise UserError(f"{run_dir} already holds a run ({found}); resume it with ckpt_path={run_dir}, "
                    f"or pass another {key}=DIR")


def _is_first_process() -> bool:
    """Not one of the other processes of a multi-process run (they share rank zero's run directory)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


class RunDirCheck(HydraCallback):
    """Hydra callback, before Hydra writes into the run directory: refuse, in one line, a directory that
    cannot be written, that holds another run, or in which another process is training now.

    The first process of a run holds an exclusive lock on `<run dir>/.lock` until it ends. Whether the
    directory was made for this run is remembered: a run that fails before its first iteration removes it.
    """

    created: Path | None = None  # the run directory, when this process made it
    _lock = None  # the open lock file, held until the process ends

    def _check_writable(self, key: str, directory: Path) -> None:
        reason = _unwritable_reason(directory)
        if reason is not None:
            _exit_with_error(f"cannot write the run directory {directory} ({reason}); pass a writable {key}=DIR")

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(config.hydra.run.dir).expanduser().absolute()
        self._check_writable("hydra.run.dir", run_dir)
        if not _is_first_process():
            return
        try:
            check_fresh_run_dir(run_dir, config.get("ckpt_path"), "hydra.run.dir")
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
        self._check_writable("hydra.sweep.dir", Path(config.hydra.sweep.dir).expanduser().absolute())


def _exit_with_error(message: str) -> None:
    say(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def remove_unstarted_run_dir(trainer: L.Trainer | None) -> None:
    """After a failure before the first iteration, remove the run directory this process made for it."""
    run_dir = RunDirCheck.created
    if run_dir is None or (trainer is not None and trainer.global_step > 0):
        return
    if HydraConfig.initialized() and Path(HydraConfig.get().runtime.output_dir).absolute() == run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
        RunDirCheck.created = None


def check_no_script_relaunch_in_sweep(trainer: L.Trainer) -> None:
    """Refuse a local sweep (-m) whose runs would have Lightning start their other processes itself.

    Lightning starts the other ranks of a DDP run by re-running this script with its command line; in a
    sweep that command line is the whole sweep, so each child would run every job of it. Processes
    started by SLURM (hydra/launcher=submitit_slurm) or torchrun are not re-run and are fine. (The
    launcher class is private to Lightning: if it is renamed, the check is skipped, training still runs.)
    """
    if _SubprocessScriptLauncher is None:
        return
    strategy = trainer.strategy
    relaunches = (isinstance(getattr(strategy, "launcher", None), _SubprocessScriptLauncher)
                  and getattr(strategy, "num_processes", 1) > 1 and strategy.cluster_environment is not None
                  and not strategy.cluster_environment.creates_processes_externally)
    if relaunches and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise UserError(f"a sweep (-m) cannot run {trainer.world_size}-process DDP runs that Lightning starts "
                        "itself; run them one at a time without -m, sweep on SLURM "
                        "(hydra/launcher=submitit_slurm), or sweep with trainer.devices=1")


def print_resume_help(stop: TrainingInterrupted) -> None:
    """Where the checkpoint is, and the commands that resume the run and sample from it."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    checkpoint = shlex.quote(str(stop.checkpoint))
    resume = " ".join(map(shlex.quote, overrides + [f"ckpt_path={stop.checkpoint}"]))
    for line in (f"\nstopped at iteration {stop.step}; checkpoint saved: {stop.checkpoint}",
                 f"resume: python scripts/train.py {resume}",
                 f"sample: python scripts/sample.py ckpt={checkpoint}"):
        say(line)


def quiet_lightning(verbose: bool) -> None:
    """Lightning's start-up lines (devices, tips, "max_steps reached") and a deprecation warning torch
    raises inside Lightning tell our users nothing they can act on; `verbose=true` keeps them."""
    if verbose:
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def train(cfg: DictConfig) -> float:
    """Train; return the last evaluated val loss (what a Hydra sweeper minimises)."""
    trainer = None
    try:
        validate_train_config(cfg)
        quiet_lightning(cfg.verbose)
        run_dir = Path(HydraConfig.get().runtime.output_dir).absolute()
        if HydraConfig.get().mode == RunMode.MULTIRUN and _is_first_process():
            check_fresh_run_dir(run_dir, cfg.ckpt_path, "hydra.sweep.dir")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        datamodule.prepare_data()
        module = build_module(cfg, datamodule)
        ckpt_path = resume_path(cfg.ckpt_path, module, cfg.trainer.max_steps, cfg.allow_other_data,
                                RESUMABLE_CHANGES)
        callbacks = [instantiate(c) for c in cfg.callbacks.values()]
        trainer = build_trainer(cfg, callbacks=callbacks, logger=instantiate(cfg.logger))
        check_no_script_relaunch_in_sweep(trainer)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingInterrupted as stop:
        if trainer is not None and trainer.is_global_zero:
            print_resume_help(stop)
        raise  # the entry point decides the exit (a single run, or a sweep that must not go on)
    except BaseException:
        remove_unstarted_run_dir(trainer)
        raise
    val_loss = trainer.callback_metrics.get(EVAL_LOSS_TAGS["val"])
    return float(val_loss) if val_loss is not None else math.nan
