"""Our own Lightning callbacks and plugins.

nanoGPT-style iteration lines and metrics, a progress bar with an ETA, loss.png, a clean stop on
Ctrl+C/SIGTERM, and atomic checkpoint writes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from time import perf_counter

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.loggers import TensorBoardLogger

from nanogpt_lightning.errors import TrainingInterrupted
from nanogpt_lightning.metrics import EVAL_LOSS_TAGS, ITER_LOSS_TAG



def print_line(trainer: L.Trainer, line: str) -> None:
    """Print once (rank zero), above the progress bar when there is one."""
    if not trainer.is_global_zero:
        return
    bar = trainer.progress_bar_callback
    if bar is not None and bar.is_enabled:
        bar.print(line)
    else:
        print(line, flush=True)


class IterationLogger(L.Callback):
    """Every `log_interval` iterations (optimizer steps): `iter N: loss X.XXXX, time Y.YYms`.

    The loss is the mean over the iteration's micro-batches; the time is the mean wall time per
    iteration since the last line, evaluation excluded. Loss, time, tokens per second and learning
    rate also go to the loggers. After each evaluation: `step N: train loss X.XXXX, val loss Y.YYYY`,
    also logged at step N.
    The loss is read from the device only on logged iterations, so other steps never wait for it.
    """

    def __init__(self, log_interval: int = 1):
        if log_interval <= 0:
            raise ValueError(f"log_interval must be a positive integer, got {log_interval}")
        self.log_interval = log_interval

    def _start_window(self, trainer: L.Trainer) -> None:
        self._window_start = perf_counter()
        self._window_first_step = trainer.global_step
        self._window_tokens = 0

    def on_train_start(self, trainer, pl_module):
        self._iteration_loss = None
        self._last_step = trainer.global_step
        self._start_window(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning hands back each micro-batch's loss divided by the accumulation: their sum is the mean
        micro_loss = outputs["loss"].detach()
        self._iteration_loss = micro_loss if self._iteration_loss is None else self._iteration_loss + micro_loss
        self._window_tokens += batch[0].numel()
        step = trainer.global_step
        if step == self._last_step:
            return  # still accumulating gradients
        self._last_step = step
        iteration_loss, self._iteration_loss = self._iteration_loss, None
        if step % self.log_interval:
            return
        seconds = perf_counter() - self._window_start
        ms_per_iter = 1000 * seconds / (step - self._window_first_step)
        loss = iteration_loss.item()
        print_line(trainer, f"iter {step}: loss {loss:.4f}, time {ms_per_iter:.2f}ms")
        metrics = {
            ITER_LOSS_TAG: loss,
            "perf/ms_per_iter": ms_per_iter,
            "perf/tokens_per_sec": self._window_tokens * trainer.world_size / seconds,
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
        losses = {split: trainer.callback_metrics.get(tag) for split, tag in EVAL_LOSS_TAGS.items()}
        if any(v is None for v in losses.values()):
            return
        print_line(trainer, f"step {trainer.global_step}: train loss {losses['train']:.4f}, "
                            f"val loss {losses['val']:.4f}")
        for logger in trainer.loggers:
            logger.log_metrics({EVAL_LOSS_TAGS[split]: float(v) for split, v in losses.items()},
                               step=trainer.global_step)


class StepProgressBar(TQDMProgressBar):
    """The training bar runs to max_steps x accumulation micro-batches, so it shows an ETA.

    (The training stream is endless, so Lightning alone would not know the total.)
    """

    @property
    def total_train_batches(self):
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps * self.trainer.accumulate_grad_batches
        return super().total_train_batches


class LossPlot(L.Callback):
    """Draw the run's losses into `<run dir>/loss.png` when training ends, also on an error or Ctrl+C.

    Reads the events of the run's TensorBoard logger (its save_dir is the run directory).
    """

    def __init__(self, filename: str = "loss.png"):
        self.filename = filename

    def on_train_end(self, trainer, pl_module):
        self._plot(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self._plot(trainer)

    def _plot(self, trainer: L.Trainer) -> None:
        logger = trainer.logger
        if not trainer.is_global_zero or not isinstance(logger, TensorBoardLogger):
            return
        # imported here: plotting imports this module, and matplotlib need not load before training
        from nanogpt_lightning.plotting import curves_from_events, plot_curves

        logger.experiment.flush()  # the events written so far, on disk
        run_dir = Path(logger.save_dir)
        curves = curves_from_events(Path(logger.log_dir), run_dir.name)
        if curves.iters.steps or curves.evals["val"].steps:
            plot_curves([curves], run_dir / self.filename, title=run_dir.name)


class GracefulInterrupt(L.Callback):
    """Ctrl+C (SIGINT) or SIGTERM: finish the current iteration, save `last.ckpt`, then stop.

    A second Ctrl+C exits at once; checkpoint writes are atomic (AtomicCheckpointIO), so that never
    leaves a half-written file. With several processes, all of them stop at the same iteration.
    """

    def __init__(self):
        self.signum = None
        self._previous_handlers = {}

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def _request_stop(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration "
              "(press Ctrl+C again to quit at once)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stop = self.signum is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if trainer.global_step == self._last_step:
            return  # mid-accumulation: the iteration is not finished yet
        self._last_step = trainer.global_step
        if not stop:
            return
        checkpoint_dir = (Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback
                          else Path(trainer.default_root_dir) / "checkpoints")
        path = checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        raise TrainingInterrupted(self.signum or signal.SIGTERM, trainer.global_step, path)

    def teardown(self, trainer, pl_module, stage):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint beside its target, then rename it into place.

    A process killed mid-write leaves the previous file whole (a rename is atomic on one filesystem).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
