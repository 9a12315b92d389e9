"""Build a training run from a composed Hydra config and run it (the body of scripts/train.py)."""

from __future__ import annotations

import copy
import math
import os
import shlex
import signal
import sys
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict

from nanogpt_lightning.checkpoints import resume_path
from nanogpt_lightning.errors import TrainingInterrupted, UserError
from nanogpt_lightning.metrics import EVAL_LOSS_TAGS
from nanogpt_lightning.module import GPTModule

# lets configs say e.g. val_check_interval: ${multiply:${eval_interval},${trainer.accumulate_grad_batches}}
OmegaConf.register_new_resolver("multiply", lambda a, b: a * b, replace=True)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    try:
        return instantiate(cfg.data)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):  # a data.* setting refused: the one line, not Hydra's wrapping
            raise err.__cause__ from None
        raise


def build_module(cfg: DictConfig, datamodule) -> GPTModule:
    """The GPT sized by the data: block size and vocabulary come from the data module, never the config."""
    try:
        model_config = instantiate(cfg.model)(block_size=datamodule.block_size, vocab_size=datamodule.vocab_size)
    except ValueError as err:
        raise UserError(str(err)) from None
    module = GPTModule(model_config, datamodule.meta["tokenizer"],
                       optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler),
                       skip_nonfinite=cfg.trainer.get("skip_nonfinite", False))
    try:
        module.configure_optimizers()  # a dry run: bad optimizer.* or scheduler.* settings fail here, not mid-fit
    except ValueError as err:
        raise UserError(str(err)) from None
    return module


def build_trainer(cfg: DictConfig, **kwargs) -> L.Trainer:
    """The Trainer from `cfg.trainer` less our own key `skip_nonfinite` (the module's); settings checked."""
    if not cfg.trainer.max_steps > 0:
        raise UserError(f"trainer.max_steps must be a positive number of iterations, got {cfg.trainer.max_steps}")
    trainer_cfg = copy.deepcopy(cfg.trainer)  # keeps its parent: interpolations still resolve
    with open_dict(trainer_cfg):
        trainer_cfg.pop("skip_nonfinite", None)
    try:
        return instantiate(trainer_cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if not isinstance(cause, MisconfigurationException):
            raise
        accelerator = cfg.trainer.get("accelerator")
        available = ["cpu"] + [name for name, kind in (("cuda", CUDAAccelerator), ("mps", MPSAccelerator))
                               if kind.is_available()]
        if accelerator in ("cuda", "mps", "gpu") and accelerator not in available and (
                accelerator != "gpu" or len(available) == 1):
            raise UserError(f"trainer.accelerator={accelerator} is not available here; available: "
                            f"{', '.join(available)} (or trainer.accelerator=auto)") from None
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


class RunDirCheck(HydraCallback):
    """Hydra callback: refuse, in one line, a run or sweep directory that cannot be written.

    Hydra creates the directory before scripts/train.py's code runs, and would fail with a traceback.
    """

    def _check(self, key: str, directory: str) -> None:
        reason = _unwritable_reason(Path(directory).expanduser().absolute())
        if reason is not None:
            print(f"error: cannot write the run directory {directory} ({reason}); "
                  f"pass a writable {key}=DIR", file=sys.stderr)
            sys.exit(1)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check("hydra.sweep.dir", config.hydra.sweep.dir)


def check_no_script_relaunch_in_sweep(trainer: L.Trainer) -> None:
    """Refuse a local sweep (-m) whose runs would have Lightning start their other processes itself.

    Lightning starts the other ranks of a DDP run by re-running this script with its command line; in a
    sweep that command line is the whole sweep, so each child would run every job of it. Processes
    started by SLURM (hydra/launcher=submitit_slurm) or torchrun are not re-run and are fine.
    """
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
    print(f"\nstopped at iteration {stop.step}; checkpoint saved: {stop.checkpoint}\n"
          f"resume: python scripts/train.py {' '.join(map(shlex.quote, overrides + [f'ckpt_path={stop.checkpoint}']))}\n"
          f"sample: python scripts/sample.py ckpt={checkpoint}", flush=True)


def train(cfg: DictConfig) -> float:
    """Train; return the last evaluated val loss (what a Hydra sweeper minimises)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    module = build_module(cfg, datamodule)
    ckpt_path = resume_path(cfg.ckpt_path, module.model_config, module.tokenizer)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    logger = instantiate(cfg.logger)
    trainer = build_trainer(cfg, callbacks=callbacks, logger=logger)
    check_no_script_relaunch_in_sweep(trainer)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingInterrupted as stop:
        if trainer.is_global_zero:
            print_resume_help(stop)
        raise  # the entry point decides the exit (a single run, or a sweep that must not go on)
    val_loss = trainer.callback_metrics.get(EVAL_LOSS_TAGS["val"])
    final_val_loss = float(val_loss) if val_loss is not None else math.nan
    # hyperparameters beside the result, for TensorBoard's HPARAMS view
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for lightning_logger in trainer.loggers:
        lightning_logger.log_hyperparams(hparams, metrics={"hp/final_val_loss": final_val_loss})
    return final_val_loss
