"""The LightningModule around the plain-PyTorch GPT: loss, evaluation, checkpoint contents (optimizers and
the LR schedule it is given: optimizers.py, schedules.py)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.optim.lr_scheduler import LambdaLR

from nanogpt_lightning.console import print_line
from nanogpt_lightning.data.tokenizer import tokenizer_from_meta
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.metrics import EVAL_BPB_TAGS, EVAL_LOSS_TAGS, SPLITS
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.train.callbacks import last_checkpoint
from nanogpt_lightning.train.checkpoints import CHECKPOINT_KEY, FORMAT_VERSION


class GPTModule(L.LightningModule):
    """Trains a GPT; an optimizer step is one iteration, whatever the gradient accumulation.

    A NaN or infinite training loss stops training, or with `skip_nonfinite` the whole iteration's update
    is skipped (all its micro-batches) and counted. Skipping decides each iteration, so it reads a flag
    from the device each iteration; stopping reads the flags of the iterations since the last read only
    where the loss is printed anyway (every `log_every_n_steps` iterations, before that iteration's
    update), before any checkpoint is written and when training ends: no checkpoint holds the weights
    of an iteration with a non-finite loss, and a GPU is not made to wait each iteration.

    Checkpoints carry, under CHECKPOINT_KEY, what sampling and resuming need: the model config, the
    tokenizer, the identity of the data (`data`) and the settings that shape the result (`run_settings`,
    also the TensorBoard HPARAMS row).
    """

    def __init__(self, model_config: GPTConfig, tokenizer: dict,
                 optimizer: Callable[[GPT], torch.optim.Optimizer],
                 scheduler: Callable[[torch.optim.Optimizer], LambdaLR],
                 skip_nonfinite: bool = False, data: dict | None = None, run_settings: dict | None = None,
                 compile_model: bool = False):
        super().__init__()
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.make_optimizer = optimizer
        self.make_scheduler = scheduler
        self.model = GPT(model_config)
        self.skip_nonfinite = skip_nonfinite
        self.data = data or {}
        self.run_settings = run_settings or {}
        self.skipped_steps = 0
        self.compile_model = compile_model
        self._token_bytes = None  # UTF-8 bytes of each token id, on the device (for bits per byte)
        self._loss_finite = None  # all of this iteration's micro-batch losses finite, on the device
        self._unread: list[tuple[int, torch.Tensor]] = []  # (iteration, its _loss_finite) not yet read

    def configure_model(self):
        """model.compile: each transformer block through torch.compile (in place: the weights keep their
        names, so checkpoints load either way); the fused loss's chunk loop stays eager."""
        if self.compile_model:
            for block in self.model.transformer.h:
                block.compile()

    def forward(self, idx, targets=None):
        return self.model(idx, targets)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        finite = torch.isfinite(loss.detach())  # stays on the device until on_before_optimizer_step
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        return loss

    def on_before_optimizer_step(self, optimizer):
        """After the iteration's last backward, before its update (and before gradient clipping)."""
        iteration = self.trainer.global_step + 1
        if self._loss_finite is not None:
            self._unread.append((iteration, self._loss_finite))
            self._loss_finite = None
        if not self.skip_nonfinite:
            if iteration % self.trainer.log_every_n_steps == 0:
                self._stop_if_a_loss_was_nonfinite()
            return
        if self._first_nonfinite_iteration() is None:
            return
        # no gradients: the optimizer leaves every parameter and its state untouched
        optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        print_line(self.trainer, f"iter {iteration}: non-finite loss, update skipped "
                                 f"({self.skipped_steps} skipped so far)")
        for logger in self.trainer.loggers:
            logger.log_metrics({"train/skipped_steps": self.skipped_steps}, step=iteration)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip as Lightning does, also under mixed precision with a fused optimizer (AdamW's), which Lightning
        refuses because such an optimizer could unscale float16 gradients itself: here they are unscaled
        first (GradScaler's step then knows), and bfloat16 has nothing to unscale."""
        if not gradient_clip_val:
            return
        plugin = self.trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # Lightning unscales the other optimizers itself, before this hook
        # the trainer passes None unless trainer.gradient_clip_algorithm is set: Lightning's default is the norm
        algorithm = gradient_clip_algorithm or GradClipAlgorithmType.NORM
        Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)

    def _first_nonfinite_iteration(self) -> int | None:
        """Read the flags not yet read (one wait for the device): the first iteration whose loss was not
        finite, or None. With several processes all of them get the same answer (stop or skip together)."""
        if not self._unread:
            return None
        iterations, flags = zip(*self._unread)
        self._unread = []
        finite = torch.stack(flags)
        first_bad = None if bool(finite.all()) else iterations[int((~finite).int().argmax())]
        if self.trainer.world_size > 1:  # another process's: named by the last iteration read
            if self.trainer.strategy.reduce_boolean_decision(first_bad is not None, all=False):
                first_bad = first_bad or iterations[-1]
        return first_bad

    def _stop_if_a_loss_was_nonfinite(self) -> None:
        first_bad = self._first_nonfinite_iteration()
        if first_bad is None:
            return
        saved = last_checkpoint(self.trainer)
        last_good = saved.path if saved.saved_step is not None else "none yet"
        raise UserError(f"non-finite loss at iteration {first_bad}; last good checkpoint: {last_good} "
                        "(lower optimizer.lr, or pass module.skip_nonfinite=true to skip such steps)")

    def on_train_end(self):
        self._stop_if_a_loss_was_nonfinite()

    def on_validation_start(self):
        if self._token_bytes is None:
            lengths = tokenizer_from_meta(self.tokenizer).byte_lengths()
            self._token_bytes = torch.tensor(lengths, dtype=torch.float32, device=self.device)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        _, loss = self.model(x, y)
        split = SPLITS[dataloader_idx]
        # averaged over the evaluation for callbacks (checkpointing, printing); IterationLogger writes
        # it to the loggers at the iteration count, where Lightning's own step would be one behind;
        # with several processes, averaged over all of them too (reduced once, when the evaluation ends)
        sync = self.trainer.world_size > 1
        self.log(EVAL_LOSS_TAGS[split], loss, on_epoch=True, add_dataloader_idx=False,
                 batch_size=x.size(0), logger=False, sync_dist=sync)
        # bits per byte of exactly these targets: weighting each batch's value by its bytes makes Lightning's
        # mean sum(nats) / (ln 2 x sum(bytes)) over the whole evaluation
        n_bytes = self._token_bytes[y].sum()
        bits_per_byte = loss.detach() * y.numel() / (math.log(2) * n_bytes)
        self.log(EVAL_BPB_TAGS[split], bits_per_byte, on_epoch=True, add_dataloader_idx=False,
                 batch_size=int(n_bytes.item()), logger=False, sync_dist=sync)

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.model)
        scheduler = self.make_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        self._stop_if_a_loss_was_nonfinite()  # before anything is written
        checkpoint[CHECKPOINT_KEY] = {"format_version": FORMAT_VERSION, "model_config": asdict(self.model_config),
                                      "tokenizer": self.tokenizer, "data": self.data, "settings": self.run_settings}
        # dropout draws from torch's generator: restoring it makes a resumed run repeat an unbroken one
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint):
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
