"""The training config: composed (compose_train_config) and every setting of it checked before PyTorch loads.

TRAIN_RULES holds one rule per setting; the `model.*` rules are GPTConfig's fields' (model/config.py), so a
model option is described once, where it is defined. The constraints across settings are checked here once
each: the model's shape (model.config.shape_refusal, which GPTConfig built in Python also says) and the
warmup below the decay (warmup_refusal, which WarmupCosineLR built in Python also says); data.block_size > 0
is its rule's. Torch-free: the scripts import this to refuse a bad setting in a second, not after torch loads.
"""

from __future__ import annotations

from string import hexdigits as HEX_DIGITS

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig

from nanogpt_lightning.config import (
    BETAS,
    BOOLEAN,
    CONF_DIR,
    DEVICE_INDICES,
    FRACTION,
    PORTION,
    POSITIVE_INT,
    PRECISION,
    SEED,
    TARGETS,
    Rule,
    check_settings,
    choice,
    hydra_error_line,
    integer,
    number,
    one_of,
    register_resolvers,
    text,
)
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.model.config import GPTConfig, model_rules, shape_refusal


def train_rules(model_config: type = GPTConfig) -> dict[str, Rule]:
    """The training config's rules, in the order they are checked; the model's from `model_config`'s fields."""
    return {
        # top level first: interpolations elsewhere (e.g. trainer.val_check_interval) are built from these
        "seed": SEED,
        "log_interval": integer(1, unit="iterations"),
        "eval_interval": integer(1, unit="iterations"),
        "eval_iters": integer(1, unit="batches"),
        "budget_s": number("60", nullable=True),
        "matmul_precision": choice("highest", "high", "medium"),
        "ckpt_path": text("outputs/runs/RUN/checkpoints/last.ckpt", nullable=True),
        "allow_other_data": BOOLEAN,
        "verbose": BOOLEAN,
        "data.input_file": text("PATH", nullable=True),
        "data.url": text("URL", nullable=True),
        "data.cache_dir": text("DIR", nullable=True),
        "data.data_dir": text("DIR"),
        "data.tokenizer": choice("char", "gpt2"),
        "data.sha256": Rule("a SHA-256 (64 hexadecimal digits)", "'" + "0" * 64 + "'",
                            lambda v: isinstance(v, str) and len(v) == 64 and all(c in HEX_DIGITS for c in v),
                            nullable=True),
        "data.val_fraction": number("0.1", below=1),
        "data.text_field": text("text"),
        "data.num_proc": integer(1, nullable=True, unit="threads"),
        "data.shard_tokens": integer(1, unit="tokens", example="100000000"),
        "data.dataset": text("HuggingFaceFW/fineweb-edu", nullable=True),
        "data.subset": text("sample-10BT", nullable=True),
        "data.split": text("train"),
        "data.revision": text("main", nullable=True),
        "data.nanogpt_dir": text("DIR", nullable=True),
        "data.block_size": POSITIVE_INT,  # the model's block_size (GPTConfig's from_data field)
        "data.batch_size": POSITIVE_INT,
        "data.num_workers": integer(0),
        "data.eval_iters": integer(1, unit="batches"),
        "data.seed": SEED,
        # model keys that the run takes itself, not GPTConfig; then GPTConfig's
        "model.init_from": text("gpt2", nullable=True),
        "model.compile": BOOLEAN,
        **model_rules(model_config),
        "module.skip_nonfinite": BOOLEAN,
        "optimizer.lr": number("0.001"),
        "optimizer.weight_decay": number("0.1", zero_allowed=True),
        "optimizer.betas": BETAS,
        "optimizer.momentum": FRACTION,  # optimizer=muon: lr, weight_decay, momentum are Muon's; adamw_*, betas AdamW's
        "optimizer.ns_steps": integer(1, unit="steps"),
        "optimizer.adamw_lr": number("0.003"),
        "optimizer.adamw_weight_decay": number("0.1", zero_allowed=True),
        "scheduler.warmup_iters": integer(0, unit="iterations"),
        "scheduler.lr_decay_iters": integer(1, unit="iterations"),
        "scheduler.min_lr": number("0.0001", zero_allowed=True),
        "scheduler.decay_lr": BOOLEAN,
        "scheduler.cooldown": PORTION,
        "scheduler.decay": choice("cosine", "linear"),
        "trainer.accelerator": choice("auto", "cpu", "gpu", "cuda", "mps"),
        "trainer.devices": one_of(integer(1, also=(-1,)), choice("auto"), DEVICE_INDICES),
        "trainer.num_nodes": POSITIVE_INT,
        "trainer.strategy": one_of(text("ddp"), Rule("a config with _target_", "ddp",
                                                     lambda v: isinstance(v, dict) and "_target_" in v)),
        "trainer.precision": PRECISION,
        "trainer.max_steps": integer(1, unit="iterations"),
        "trainer.max_epochs": integer(1, also=(-1,)),
        "trainer.accumulate_grad_batches": POSITIVE_INT,
        "trainer.gradient_clip_val": number("1.0", zero_allowed=True, nullable=True),
        "trainer.val_check_interval": integer(1, unit="micro-batches"),
        "trainer.check_val_every_n_epoch": integer(1, nullable=True),
        "trainer.num_sanity_val_steps": integer(0, also=(-1,)),
        "trainer.enable_model_summary": BOOLEAN,
        "trainer.log_every_n_steps": integer(1, unit="iterations"),
        "trainer.default_root_dir": text("DIR"),
        "trainer.plugins": TARGETS,
        "callbacks.iteration_logger.log_interval": integer(1, unit="iterations"),
        "callbacks.progress_bar.refresh_rate": integer(0),
        "callbacks.model_checkpoint.dirpath": text("DIR"),
        "callbacks.model_checkpoint.filename": text("best"),
        "callbacks.model_checkpoint.monitor": text("val/loss"),
        "callbacks.model_checkpoint.mode": choice("min", "max"),
        "callbacks.model_checkpoint.save_top_k": integer(0, also=(-1,)),
        "callbacks.model_checkpoint.save_last": BOOLEAN,
        "callbacks.model_checkpoint.enable_version_counter": BOOLEAN,
        "callbacks.model_checkpoint.auto_insert_metric_name": BOOLEAN,
        "callbacks.last_checkpoint": Rule("a callback config with _target_, or null (no last.ckpt)", "null",
                                          lambda v: isinstance(v, dict) and "_target_" in v, nullable=True),
        "callbacks.last_checkpoint.dirpath": text("DIR"),
        "logger.save_dir": text("DIR"),
        "logger.name": text("tensorboard", nullable=True),
        "logger.version": one_of(text("v1"), integer(0), nullable=True),
        "logger.default_hp_metric": BOOLEAN,
        "logger.project": text("nanogpt-lightning"),  # logger=wandb
        "logger.offline": Rule("true or false", "true", lambda v: isinstance(v, bool), nullable=True),
        "logger.tensorboard.save_dir": text("DIR"),  # logger=many: each logger's keys under its name
        "logger.tensorboard.name": text("tensorboard", nullable=True),
        "logger.tensorboard.version": one_of(text("v1"), integer(0), nullable=True),
        "logger.tensorboard.default_hp_metric": BOOLEAN,
        "logger.csv.save_dir": text("DIR"),
        "logger.csv.name": text("csv", nullable=True),
        "logger.csv.version": one_of(text("v1"), integer(0), nullable=True),
    }


TRAIN_RULES: dict[str, Rule] = train_rules()


def warmup_refusal(warmup_iters: int, lr_decay_iters: int, decay_lr: bool = True) -> str | None:
    """The warmup must end before the decay does (unless the rate is constant): the one line saying it, or None.
    The one check of both the training config and a WarmupCosineLR built in Python."""
    if decay_lr and warmup_iters >= lr_decay_iters:
        return (f"scheduler.warmup_iters must be below scheduler.lr_decay_iters ({lr_decay_iters}), "
                f"got {warmup_iters}; pass a smaller scheduler.warmup_iters, a larger scheduler.lr_decay_iters, "
                "or scheduler.decay_lr=false")
    return None


def validate_train_config(cfg: DictConfig) -> None:
    """Refuse the first bad setting of a training config (conf/train.yaml composed), including the
    combinations: the model's shape (n_embd a multiple of n_head, an even head size under rotary), warmup
    shorter than the decay. Registers the resolvers the values need, so any composed config can be checked."""
    register_resolvers()
    values = check_settings(cfg, TRAIN_RULES)
    n_embd, n_head = values.get("model.n_embd"), values.get("model.n_head")
    if n_embd is not None and n_head is not None:
        message = shape_refusal(n_embd, n_head, values.get("model.rotary", False))
        if message:
            raise UserError(message)
    warmup, decay = values.get("scheduler.warmup_iters"), values.get("scheduler.lr_decay_iters")
    if warmup is not None and decay is not None:
        message = warmup_refusal(warmup, decay, values.get("scheduler.decay_lr", True))
        if message:
            raise UserError(message)


def compose_train_config(overrides: list[str], output_dir: str | None = None) -> DictConfig:
    """conf/train.yaml with `overrides`, checked, outside a Hydra run (scripts/prepare.py, the benchmark).

    With `output_dir` the config keeps its `hydra` node and becomes the current Hydra config, so
    `${hydra:runtime.output_dir}` resolves to `output_dir`.
    """
    register_resolvers()
    if output_dir is not None:
        overrides = [*overrides, f"hydra.runtime.output_dir={output_dir}"]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=output_dir is not None)
    except HydraException as err:
        raise UserError(hydra_error_line(err)) from None
    if output_dir is not None:
        HydraConfig.instance().set_config(cfg)
    validate_train_config(cfg)
    return cfg
