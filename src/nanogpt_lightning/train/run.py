"""Build a training run from a composed Hydra config and run it (the body of scripts/train.py)."""

from __future__ import annotations

import inspect
import logging
import math
import shlex
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from nanogpt_lightning.config import ABSENT
from nanogpt_lightning.console import say
from nanogpt_lightning.devices import (
    PRECISION_ALIASES,
    auto_precision,
    check_compile,
    check_precision,
    pick_device,
)
from nanogpt_lightning.errors import TrainingInterrupted, UserError, naming
from nanogpt_lightning.metrics import EVAL_LOSS_TAGS
from nanogpt_lightning.train import checkpoints
from nanogpt_lightning.train.callbacks import TimeBudget, finished_run_help
from nanogpt_lightning.train.checkpoints import init_from
from nanogpt_lightning.train.module import GPTModule
from nanogpt_lightning.train.rundir import check_fresh_run_dir, is_first_process

try:  # private to Lightning: see check_no_script_relaunch_in_sweep
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
except ImportError:
    _SubprocessScriptLauncher = None

# the settings that shape a run's result (groups: all their keys); a resumed run must repeat them, except these
RESULT_SETTINGS = ("data.tokenizer", "data.val_fraction", "data.block_size", "data.batch_size", "model", "module",
                   "optimizer", "scheduler", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
                   "trainer.precision", "matmul_precision", "trainer.max_steps", "budget_s", "seed")
RESUMABLE_CHANGES = ("trainer.max_steps", "budget_s", "model.compile")  # train further, or compiled or not


def resolve_precision(cfg: DictConfig, device: torch.device) -> None:
    """Set trainer.precision=auto to what it means on the run's `device` (bfloat16 mixed where the device
    computes it fast, devices.auto_precision) and Lightning's short names (bf16, 32) to the long ones; refuse
    a precision the device lacks. The run's settings (HPARAMS, resume checks) then record the precision that
    trained under one name. Apply matmul_precision (TF32)."""
    precision = str(cfg.trainer.precision)  # YAML reads 32 as an int
    cfg.trainer.precision = (auto_precision(device) if precision == "auto"
                             else PRECISION_ALIASES.get(precision, precision))
    with naming(key="trainer.precision"):
        check_precision(str(cfg.trainer.precision), device)
    torch.set_float32_matmul_precision(cfg.matmul_precision)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    try:
        return instantiate(cfg.data)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):  # a data.* setting refused: the one line, not Hydra's wrapping
            raise err.__cause__ from None
        raise


def run_settings(cfg: DictConfig) -> dict:
    """The settings that shape a run's result, flat (`optimizer.lr`): its TensorBoard HPARAMS row, and what a
    resumed run must repeat (RESUMABLE_CHANGES aside). Groups give all their keys but `_partial_` and the like;
    `_target_` is kept (`optimizer._target_`), so a resume that switches the optimizer is refused by the check."""
    settings = {}
    for key in RESULT_SETTINGS:
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if isinstance(value, DictConfig):
            settings |= {f"{key}.{k}": v for k, v in OmegaConf.to_container(value, resolve=True).items()
                         if k == "_target_" or not k.startswith("_")}
        elif value is not ABSENT:
            settings[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    return settings


def resume_path(spec: str | None, module, max_steps: int, budget_s: float | None, allow_other_data: bool,
                may_change: tuple[str, ...]) -> Path | None:
    """The checkpoint file a `ckpt_path=` setting names, checked against the run about to start (`module`,
    a GPTModule): same shapes and vocabulary, same data unless allowed, same settings, not already done
    (its iterations, or under a time budget its seconds)."""
    if spec is None:
        return None
    with naming(key="ckpt_path"):
        path = checkpoints.resolve_checkpoint(spec)
        checkpoint = checkpoints.read_checkpoint(path)
    checkpoints.check_resumable(checkpoint, module.model_config, module.tokenizer, path)
    if not allow_other_data:
        checkpoints.check_same_data(checkpoint, module.data, path)
    checkpoints.check_same_settings(checkpoint, module.run_settings, path, may_change)
    step = checkpoint.get("global_step", 0)
    if budget_s is not None:
        used = TimeBudget.seconds_trained(checkpoint)
        if used >= budget_s:
            raise UserError(f"the run of {path} is already complete: it trained {used:.1f}s of budget_s={budget_s:g}; "
                            "pass a larger budget_s to train further")
    elif step >= max_steps:
        raise UserError(f"the run of {path} is already complete: it reached iteration {step} of "
                        f"trainer.max_steps={max_steps}; pass a larger trainer.max_steps to train further")
    return path


def build_module(cfg: DictConfig, datamodule, device: torch.device) -> GPTModule:
    """The GPT sized by the data: block size and vocabulary come from the data module, never the config.

    With `model.init_from` the shape, the options and the weights are those of GPT-2 or of a checkpoint
    (checkpoints.init_from); the model keys of `cfg.model` are set to theirs so the run's settings (HPARAMS,
    resume checks) tell what trained."""
    model_settings = OmegaConf.to_container(cfg.model, resolve=True)
    spec = model_settings.pop("init_from", None)
    compile_model = model_settings.pop("compile", False)
    if compile_model:
        check_compile(device)
    load_weights = None
    try:
        if spec is None:
            model_config = instantiate(model_settings)(block_size=datamodule.block_size,
                                                       vocab_size=datamodule.vocab_size)
        else:
            model_config, load_weights = init_from(spec, datamodule.meta["tokenizer"], datamodule.block_size,
                                                   model_settings)
            with open_dict(cfg.model):
                for field in fields(model_config):
                    if field.name in cfg.model:
                        cfg.model[field.name] = getattr(model_config, field.name)
    except ValueError as err:
        raise UserError(str(err)) from None
    for group in ("optimizer", "scheduler"):
        check_settings_taken(cfg, group)
    module = instantiate(cfg.module)(model_config, datamodule.meta["tokenizer"],
                                     optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler),
                                     data=datamodule.identity, run_settings=run_settings(cfg),
                                     compile_model=compile_model)
    if load_weights is not None:
        load_weights(module.model)
    try:
        module.configure_optimizers()  # a dry run: bad optimizer.* or scheduler.* settings fail here, not mid-fit
    except ValueError as err:
        raise UserError(str(err)) from None
    return module


def check_settings_taken(cfg: DictConfig, group: str, taken_here: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, a key that its target does not take, in the config `group` and in every config with
    `_target_` inside it: e.g. Muon's keys, left by an experiment, after optimizer=adamw; `+trainer.max_stepz=3`;
    a trainer plugin's (trainer.plugins.0.KEY), a callback's (callbacks.NAME.KEY), a logger's (logger.KEY, or
    logger=many's logger.NAME.KEY). Instantiating them would fail in Hydra's traceback (or, for a key a target
    passes on in **kwargs, mid-run); a `_target_` that cannot be imported is one line too. `taken_here`: keys
    of `group` the caller takes itself, not its target (model.init_from)."""
    from hydra._internal.utils import _locate  # what instantiate uses; get_method would log its own error

    # targets that pass their **kwargs on: the first of these that imports takes them
    passed_on = {"lightning.pytorch.loggers.TensorBoardLogger": ("torch.utils.tensorboard.SummaryWriter",
                                                                  "tensorboardX.SummaryWriter")}

    def parameters(path: str, target: str) -> dict | None:  # None: takes any keyword
        try:
            taken = dict(inspect.signature(_locate(target)).parameters)
        except ImportError as err:
            raise UserError(f"{path}._target_={target} cannot be imported ({str(err).splitlines()[0]}); "
                            f"fix it or drop {path}") from None
        except (TypeError, ValueError):  # no signature to read (a builtin): instantiating will tell
            return None
        if not any(p.kind == p.VAR_KEYWORD for p in taken.values()):
            return taken
        for receiver in passed_on.get(target, ()):
            try:
                return taken | dict(inspect.signature(_locate(receiver)).parameters)
            except ImportError:
                continue
        return None

    def check(node, path: str, noun: str, skipped: tuple[str, ...] = ()) -> None:
        if isinstance(node, ListConfig):
            for i, item in enumerate(node):
                check(item, f"{path}.{i}", noun)
            return
        if not isinstance(node, DictConfig):
            return
        children = list(node.items_ex(resolve=False))
        if "_target_" in node:
            target = str(node._target_)
            taken = parameters(path, target)
            for key, _ in children:
                if taken is not None and not key.startswith("_") and key not in taken and key not in skipped:
                    raise UserError(f"{path}.{key} is not a setting of this {noun} ({target.rsplit('.', 1)[-1]}); "
                                    f"drop it with ~{path}.{key}")
            for key, child in children:  # configs it takes: a strategy, plugins
                check(child, f"{path}.{key}", key.removesuffix("s"))
        else:  # named configs of one kind: callbacks.NAME, logger=many's logger.NAME
            for key, child in children:
                check(child, f"{path}.{key}", noun)

    check(OmegaConf.select(cfg, group), group, group.rsplit(".", 1)[-1].removesuffix("s"), taken_here)


def build_loggers(logger_cfg: DictConfig | None):
    """One logger (a config with `_target_`), or several (a config of named loggers: logger=many)."""
    try:
        if logger_cfg is None or "_target_" in logger_cfg:
            return instantiate(logger_cfg)
        return [instantiate(c) for c in logger_cfg.values() if c is not None]
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):  # e.g. logger=wandb without wandb installed: the one line
            raise err.__cause__ from None
        raise


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The run's callbacks: those of `cfg.callbacks` (`callbacks.NAME=null` leaves one out), and TimeBudget
    under `budget_s`."""
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    if cfg.budget_s is not None:
        callbacks.append(TimeBudget(cfg.budget_s))
    return callbacks


def build_trainer(cfg: DictConfig, extra_callbacks: tuple[L.Callback, ...] = ()) -> L.Trainer:
    """The Trainer of `cfg.trainer` with the run's callbacks (and `extra_callbacks`, e.g. bench's clock) and
    loggers; under a time budget the budget ends the run, not an iteration count. A device that is not here,
    or settings Lightning refuses: one line."""
    for group in ("trainer", "callbacks", "logger"):  # a key no target takes: one line, before any is built
        check_settings_taken(cfg, group)
    kwargs = {"callbacks": [*build_callbacks(cfg), *extra_callbacks], "logger": build_loggers(cfg.logger)}
    if cfg.budget_s is not None:
        kwargs["max_steps"] = -1
    try:
        return instantiate(cfg.trainer, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if not isinstance(cause, MisconfigurationException):
            raise
        raise UserError(f"trainer settings: {(str(cause).splitlines() or [''])[0]}") from None


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
    """Lightning's start-up lines (devices, tips, "max_steps reached"), a deprecation warning torch raises
    inside Lightning and a warning about resuming in place tell our users nothing they can act on;
    `verbose=true` keeps them."""
    if verbose:
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # a run resumed in place writes into its own checkpoints/; another run's are refused (rundir.py)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # resuming into another run directory: the run says "resumed from iteration N of RUN" instead
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    # on a machine with SLURM's tools, outside a SLURM job: a hint for those who meant to start under srun
    # (docs/scaling.md shows how); a run under srun or the submitit launcher never sees it
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


def train(cfg: DictConfig) -> float:
    """Train; return the last evaluated val loss (what a Hydra sweeper minimises).

    `cfg` has been checked (config.validate_train_config, as scripts/train.py and compose_train_config do)."""
    quiet_lightning(cfg.verbose)
    if HydraConfig.get().mode == RunMode.MULTIRUN and is_first_process():
        with naming(key="hydra.sweep.dir"):
            check_fresh_run_dir(Path(HydraConfig.get().runtime.output_dir).absolute(), cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with naming(key="trainer.accelerator"):
        device = pick_device(cfg.trainer.accelerator)  # once for the run, passed down
    resolve_precision(cfg, device)
    for group in ("data", "model", "module", "optimizer", "scheduler", "trainer", "callbacks", "logger"):
        check_settings_taken(cfg, group, taken_here=("init_from", "compile") if group == "model" else ())
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    module = build_module(cfg, datamodule, device)
    ckpt_path = resume_path(cfg.ckpt_path, module, cfg.trainer.max_steps, cfg.budget_s, cfg.allow_other_data,
                            RESUMABLE_CHANGES)
    trainer = build_trainer(cfg)
    check_no_script_relaunch_in_sweep(trainer)
    if not trainer.checkpoint_callbacks and trainer.is_global_zero:
        say("warning: this run saves no checkpoint (callbacks.model_checkpoint and callbacks.last_checkpoint "
            "are null, trainer.enable_checkpointing is false)", file=sys.stderr)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingInterrupted as stop:
        if trainer.is_global_zero:
            print_resume_help(stop)
        raise  # the entry point decides the exit (a single run, or a sweep that must not go on)
    if trainer.is_global_zero:
        for line in finished_run_help(trainer):
            say(line)
    val_loss = trainer.callback_metrics.get(EVAL_LOSS_TAGS["val"])
    return float(val_loss) if val_loss is not None else math.nan
