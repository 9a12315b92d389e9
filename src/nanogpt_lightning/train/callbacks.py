"""Our own Lightning callbacks.

nanoGPT-style iteration lines and metrics, the run's summary (start-up line, TensorBoard HPARAMS), a
progress bar with an ETA on terminals, a time budget, last.ckpt at every evaluation and at the end, loss.png,
and a clean stop on Ctrl+C/SIGTERM. (Checkpoints are written whole by train/checkpoint_io.py.)
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from time import perf_counter

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from nanogpt_lightning.console import print_line
from nanogpt_lightning.data.prepare import describe_data
from nanogpt_lightning.errors import TrainingInterrupted
from nanogpt_lightning.flops import peak_flops
from nanogpt_lightning.metrics import EVAL_BPB_TAGS, EVAL_LOSS_TAGS, ITER_LOSS_TAG
from nanogpt_lightning.plotting import plot_curves, run_curves
from nanogpt_lightning.train.checkpoint_io import AtomicCheckpointIO

# HPARAMS' metric columns: the final evaluation's losses and bits per byte
FINAL_TAGS = {tag: f"hp/final_{tag.replace('/', '_')}" for tag in (*EVAL_LOSS_TAGS.values(), *EVAL_BPB_TAGS.values())}


class IterationCallback(L.Callback):
    """A callback that acts once per iteration (optimizer step): `on_iteration_end` runs at the micro-batch that
    completes one, whatever the gradient accumulation."""

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.on_iteration_end(trainer, pl_module)

    def on_iteration_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError


class IterationLogger(IterationCallback):
    """Every `log_interval` iterations (optimizer steps): `iter N: loss X.XXXX, time Y.YYms, mfu Z.ZZ%`.

    The loss is the mean over the iteration's micro-batches; the time is the mean wall time per
    iteration since the last line, evaluation excluded; mfu (nanoGPT's model FLOPs utilisation) is the
    model's FLOPs for this process's tokens in that time (GPT.flops_per_token) against the device's peak
    (flops.peak_flops, named once before the first line). Loss, time, tokens per second, mfu (in %) and
    learning rate also go to the loggers. After each evaluation: `step N: train loss X.XXXX, val loss Y.YYYY,
    val bpb Z.ZZZZ` (bits per byte), losses and bits per byte of both splits also logged at step N.
    The loss is read from the device only on logged iterations, so other steps never wait for it.
    """

    def __init__(self, log_interval: int = 1):
        self.log_interval = log_interval

    def _start_window(self, trainer: L.Trainer) -> None:
        self._window_start = perf_counter()
        self._window_first_step = trainer.global_step
        self._window_tokens = 0

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._iteration_loss = None
        self._flops_per_token = pl_module.model.flops_per_token()
        self._peak = peak_flops(pl_module.device, trainer.precision)
        self._peak_note = (f"mfu: the model's flops per second against {self._peak.source} "
                           f"({self._peak.flops / 1e12:.3g} TFLOP/s)")
        self._start_window(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning hands back each micro-batch's loss divided by the accumulation: their sum is the mean
        micro_loss = outputs["loss"].detach()
        self._iteration_loss = micro_loss if self._iteration_loss is None else self._iteration_loss + micro_loss
        self._window_tokens += batch[0].numel()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_iteration_end(self, trainer, pl_module):
        step = trainer.global_step
        iteration_loss, self._iteration_loss = self._iteration_loss, None
        if step % self.log_interval:
            return
        seconds = perf_counter() - self._window_start
        ms_per_iter = 1000 * seconds / (step - self._window_first_step)
        loss = iteration_loss.item()
        model_flops = self._flops_per_token * self._window_tokens / seconds
        if self._peak_note:
            print_line(trainer, self._peak_note)
            self._peak_note = None
        if model_flops > self._peak.flops and self._peak.measured:
            # the peak was measured while the machine was busy: measured again; the model's rate is a floor
            again = peak_flops(pl_module.device, trainer.precision, again=True)
            self._peak = again._replace(flops=max(again.flops, model_flops))
            print_line(trainer, f"mfu: the peak measured again, the first was low: {self._peak.flops / 1e12:.3g} "
                       "TFLOP/s")
        mfu = 100 * model_flops / self._peak.flops
        print_line(trainer, f"iter {step}: loss {loss:.4f}, time {ms_per_iter:.2f}ms, mfu {mfu:.2f}%")
        metrics = {
            ITER_LOSS_TAG: loss,
            "perf/ms_per_iter": ms_per_iter,
            "perf/tokens_per_sec": self._window_tokens * trainer.world_size / seconds,
            "perf/mfu": mfu,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._start_window(trainer)

    def on_validation_start(self, trainer, pl_module):
        self._eval_start = perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self._window_start += perf_counter() - self._eval_start  # evaluation time is not iteration time
        if trainer.sanity_checking:
            return
        tags = (*EVAL_LOSS_TAGS.values(), *EVAL_BPB_TAGS.values())
        values = {tag: trainer.callback_metrics.get(tag) for tag in tags}
        if any(v is None for v in values.values()):
            return
        print_line(trainer, f"step {trainer.global_step}: train loss {values[EVAL_LOSS_TAGS['train']]:.4f}, "
                            f"val loss {values[EVAL_LOSS_TAGS['val']]:.4f}, val bpb {values[EVAL_BPB_TAGS['val']]:.4f}")
        for logger in trainer.loggers:
            logger.log_metrics({tag: float(v) for tag, v in values.items()}, step=trainer.global_step)


class StepProgressBar(TQDMProgressBar):
    """A bar that runs to max_steps x accumulation micro-batches, so it shows an ETA; on terminals only.

    (The training stream is endless, so Lightning alone would not know the total.) Under a time budget it
    runs over the budget's seconds of training instead. When stdout is a file or a pipe the bar stays off:
    a log then holds whole lines only, as nanoGPT's does.
    """

    @property
    def is_enabled(self) -> bool:
        return super().is_enabled and sys.stdout.isatty()

    @property
    def total_train_batches(self):
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps * self.trainer.accumulate_grad_batches
        return super().total_train_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        budget = time_budget(trainer)
        if budget is None or not self.is_enabled:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        bar.bar_format = "{l_bar}{bar}| {n:.0f}/{total:.0f}s of training [{elapsed}<{remaining}{postfix}]"
        bar.total = budget.seconds
        bar.n = min(budget.seconds_used(), budget.seconds)
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()


class TimeBudget(IterationCallback):
    """`budget_s`: stop after `seconds` of training time, evaluate and save as at a normal end.

    Training time runs from the start of each training batch to the next evaluation: evaluations and the
    checkpoints saved after them do not count, so the same budget buys the same training on a run that
    evaluates often. Nor does compiling (model.compile): torch.compile compiles inside the first iteration
    of each process, so that iteration's forwards and backwards are left out, their seconds printed once.
    The LR schedule follows the fraction of the budget used (WarmupCosineLR.follow). The seconds used are
    kept in checkpoints: a resumed run spends what is left.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._used = 0.0  # training seconds before the running stretch
        self._since: float | None = None  # start of the running stretch; None while paused
        self._compiling = False  # the first iteration of a compiled model is under way: compiling

    def seconds_used(self) -> float:
        return self._used + (perf_counter() - self._since if self._since is not None else 0.0)

    def fraction_used(self) -> float:
        return min(1.0, self.seconds_used() / self.seconds)

    def _pause(self) -> None:
        self._used, self._since = self.seconds_used(), None

    @classmethod
    def seconds_trained(cls, checkpoint: dict) -> float:
        """The seconds of training a checkpoint's run had used under its budget (0 without one)."""
        return checkpoint.get("callbacks", {}).get(cls.__qualname__, {}).get("seconds_used", 0.0)

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._compiling = pl_module.compile_model
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "follow"):
                config.scheduler.follow(self.fraction_used)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._since is None:
            self._since = perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # the first iteration's forwards and backwards held the compiling: the clock starts again before its
        # update, so the LR schedule never sees those seconds either
        if self._compiling:
            self._compiling = False
            now = perf_counter()
            compile_s, self._since = now - self._since, now
            print_line(trainer, f"compiled in {compile_s:.1f}s (not counted in budget_s)")

    def on_iteration_end(self, trainer, pl_module):
        spent = self.seconds_used() >= self.seconds
        if trainer.world_size > 1:
            spent = trainer.strategy.reduce_boolean_decision(spent, all=False)  # all ranks stop together
        if spent:
            trainer.should_stop = True  # Lightning then evaluates once more and ends as at max_steps

    def on_validation_start(self, trainer, pl_module):
        self._pause()

    def on_train_end(self, trainer, pl_module):
        self._pause()

    def state_dict(self):
        return {"seconds_used": self.seconds_used()}

    def load_state_dict(self, state_dict):
        self._used = state_dict["seconds_used"]


class FinalEvaluation(IterationCallback):
    """Evaluate (and so save: best.ckpt, last.ckpt) at the last iteration, whatever `eval_interval` is.

    A run of `trainer.max_steps` not a multiple of the evaluation interval would otherwise end on an iteration
    Lightning never evaluated: no final val loss, no best checkpoint. Asking Lightning to stop at the last
    iteration (as TimeBudget does at the end of its budget) makes it evaluate once more there; an iteration it
    evaluates anyway is evaluated once.
    """

    def on_iteration_end(self, trainer, pl_module):
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def time_budget(trainer: L.Trainer) -> TimeBudget | None:
    return next((c for c in trainer.callbacks if isinstance(c, TimeBudget)), None)


class RunSummary(L.Callback):
    """What a run is, for the user and for TensorBoard.

    At the start: the data it trains on, and one line with the model size, tokens per iteration, device, precision
    and run directory; and the HPARAMS row of the settings that shape the result (`pl_module.run_settings`),
    written while the logger is open. When training ends, whatever ends it: the final evaluation losses in
    that row's columns.
    """

    def on_train_start(self, trainer, pl_module):
        if trainer.ckpt_path is not None:  # restored by now: the iteration it goes on from
            checkpoint = Path(trainer.ckpt_path)
            run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
            print_line(trainer, f"resumed from iteration {trainer.global_step} of {run}")
        data = trainer.datamodule
        tokens = data.batch_size * data.block_size * trainer.accumulate_grad_batches * trainer.world_size
        print_line(trainer, f"data: {describe_data(data.identity)} in {data.prepared_dir}")
        n_params = pl_module.model.num_params(non_embedding=False)
        print_line(trainer, f"{n_params:,} parameters, {tokens:,} tokens per iteration, {pl_module.device.type} x "
                            f"{trainer.world_size} in {trainer.precision}, run directory {trainer.default_root_dir}")
        none_yet = {tag: math.nan for tag in FINAL_TAGS.values()}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # its HPARAMS columns; other loggers take no metrics here
                logger.log_hyperparams(pl_module.run_settings, metrics=none_yet)
            else:
                logger.log_hyperparams(pl_module.run_settings)

    def on_train_end(self, trainer, pl_module):
        self._log_final_metrics(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self._log_final_metrics(trainer)

    @staticmethod
    def _log_final_metrics(trainer: L.Trainer) -> None:
        final = {FINAL_TAGS[tag]: float(trainer.callback_metrics[tag])
                 for tag in FINAL_TAGS if tag in trainer.callback_metrics}
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)
            logger.save()


def checkpoints_saved(trainer: L.Trainer) -> list[Path]:
    """The checkpoint files in the folders the run's checkpoint callbacks save into, best.ckpt first."""
    folders = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
    folders |= {c.path.parent for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)}
    found = sorted(p for folder in folders for p in folder.glob("*.ckpt"))
    return sorted(found, key=lambda p: p.name != "best.ckpt")


def finished_run_help(trainer: L.Trainer) -> list[str]:
    """What a finished run says last: its final evaluation, where its checkpoints are, and the commands that
    sample from its best checkpoint, evaluate it and show its curves."""
    metrics = trainer.callback_metrics
    val_loss, val_bpb = (metrics.get(tag) for tag in (EVAL_LOSS_TAGS["val"], EVAL_BPB_TAGS["val"]))
    evaluated = (f"val loss {float(val_loss):.4f}, val bpb {float(val_bpb):.4f}"
                 if val_loss is not None and val_bpb is not None else "not evaluated")
    lines = [f"\nfinished at iteration {trainer.global_step}: {evaluated}"]
    saved = checkpoints_saved(trainer)
    if saved:
        folders = sorted({str(p.parent) for p in saved})
        lines.append(f"checkpoints: {', '.join(p.name for p in saved)} in {', '.join(folders)}")
        ckpt = shlex.quote(str(saved[0]))
        lines += [f"sample: python scripts/sample.py ckpt={ckpt}", f"evaluate: python scripts/eval.py ckpt={ckpt}"]
    else:
        lines.append("warning: this run saved no checkpoint")
    logdirs = [logger.log_dir for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    lines += [f"curves: tensorboard --logdir {shlex.quote(str(Path(logdir)))}" for logdir in logdirs[:1]]
    return lines


class LossPlot(L.Callback):
    """Draw the run's losses into `<run dir>/loss.png` when training ends, also on an error or Ctrl+C.

    Reads what the run's loggers wrote into the run directory (their save_dir, else the Trainer's root dir):
    TensorBoard's events, else CSV logs, else the run's train.log (plotting.run_curves), so any loggers do.
    """

    def __init__(self, filename: str = "loss.png"):
        self.filename = filename

    def on_train_end(self, trainer, pl_module):
        self._plot(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self._plot(trainer)

    def _plot(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # what was logged so far, on disk
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.flush()
            logger.save()
        save_dirs = [logger.save_dir for logger in trainer.loggers if logger.save_dir]
        run_dir = Path(save_dirs[0] if save_dirs else trainer.default_root_dir)
        curves = run_curves(run_dir)
        if curves.iters.steps or curves.evals["val"].steps:
            plot_curves([curves], run_dir / self.filename, title=run_dir.name)


class LastCheckpoint(Checkpoint):
    """`<dirpath>/last.ckpt`: the whole state after every evaluation and when training ends, whatever ends it.

    (Lightning's ModelCheckpoint(save_last=True) writes it only when it also writes a best checkpoint.)
    A Checkpoint, so Lightning runs it after ModelCheckpoint: the state it saves knows this evaluation's best.
    """

    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "last.ckpt"
        self.saved_step: int | None = None

    def save(self, trainer: L.Trainer) -> Path:
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path)
            self.saved_step = trainer.global_step
        return self.path

    def setup(self, trainer, pl_module, stage):
        if trainer.is_global_zero:
            AtomicCheckpointIO.remove_stale_partial_files(self.path.parent)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module):
        self.save(trainer)


def last_checkpoint(trainer: L.Trainer) -> LastCheckpoint:
    """The run's LastCheckpoint callback; one saving into the run's checkpoints/ if the config has none."""
    found = [c for c in trainer.callbacks if isinstance(c, LastCheckpoint)]
    return found[0] if found else LastCheckpoint(str(Path(trainer.default_root_dir) / "checkpoints"))


class GracefulInterrupt(IterationCallback):
    """Ctrl+C (SIGINT) or SIGTERM: finish the current iteration, save `last.ckpt`, then stop.

    A second Ctrl+C exits at once, removing a checkpoint it was writing (AtomicCheckpointIO never leaves a
    half-written one in place). With several processes, all of them stop at the same iteration.
    """

    def __init__(self):
        self.signum = None
        self._previous_handlers = {}

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self._request_stop)
            self._previous_handlers.setdefault(signum, previous)

    def setup(self, trainer, pl_module, stage):
        self._install_handlers()  # from the start of fit: Lightning would take a Ctrl+C before training itself

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        # again: when fit starts, Lightning puts its own SIGTERM handler in front (it ends fit quietly)
        self._install_handlers()

    def _request_stop(self, signum, frame):
        if self.signum is not None:
            AtomicCheckpointIO.remove_partial_files()
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration "
              "(press Ctrl+C again to quit at once)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._stop = self.signum is not None
        if trainer.world_size > 1:  # every micro-batch: each process reduces as often as the others
            self._stop = trainer.strategy.reduce_boolean_decision(self._stop, all=False)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_iteration_end(self, trainer, pl_module):
        if not self._stop:
            return
        path = last_checkpoint(trainer).save(trainer)
        raise TrainingInterrupted(self.signum or signal.SIGTERM, trainer.global_step, path)

    def teardown(self, trainer, pl_module, stage):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
