"""Build a training run from a composed Hydra config and run it (the body of scripts/train.py)."""

from __future__ import annotations

import math
import shlex
import signal
import sys

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nanogpt_lightning.callbacks import EVAL_LOSS_TAGS, TrainingInterrupted
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.module import GPTModule

# lets configs say e.g. val_check_interval: ${multiply:${eval_interval},${trainer.accumulate_grad_batches}}
OmegaConf.register_new_resolver("multiply", lambda a, b: a * b, replace=True)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    return instantiate(cfg.data)


def build_module(cfg: DictConfig, datamodule) -> GPTModule:
    """The GPT sized by the data: block size and vocabulary come from the data module, never the config."""
    try:
        model_config = instantiate(cfg.model)(block_size=datamodule.block_size, vocab_size=datamodule.vocab_size)
    except ValueError as err:
        raise UserError(str(err)) from None
    return GPTModule(model_config, datamodule.meta["tokenizer"],
                     optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler))


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
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    logger = instantiate(cfg.logger)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except TrainingInterrupted as stop:
        if trainer.is_global_zero:
            print_resume_help(stop)
        if stop.signum != signal.SIGINT:
            sys.exit(128 + stop.signum)  # SIGTERM: tell the scheduler the job did not finish
    val_loss = trainer.callback_metrics.get(EVAL_LOSS_TAGS["val"])
    final_val_loss = float(val_loss) if val_loss is not None else math.nan
    # hyperparameters beside the result, for TensorBoard's HPARAMS view
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for lightning_logger in trainer.loggers:
        lightning_logger.log_hyperparams(hparams, metrics={"hp/final_val_loss": final_val_loss})
    return final_val_loss
