"""Compose the training config and check every setting of it and of the sampling config, in one place.

Each knob has one rule in a table (TRAIN_RULES, SAMPLE_RULES), so a bad value is refused before anything
is built or downloaded, in one line that names the key: `optimizer.lr must be a positive number, got 0`.
Values are checked as YAML typed them, after interpolations resolve: `abc` is a string, `true` a bool
(never an integer), `1e3` a float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanogpt_lightning.errors import UserError

CONF_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use, e.g. `${multiply:${eval_interval},${trainer.accumulate_grad_batches}}`;
    needed before their values resolve. Safe to call more than once."""
    if not OmegaConf.has_resolver("multiply"):
        OmegaConf.register_new_resolver("multiply", lambda a, b: a * b)


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
        raise UserError(str(err).splitlines()[0]) from None
    if output_dir is not None:
        HydraConfig.instance().set_config(cfg)
    validate_train_config(cfg)
    return cfg


@dataclass(frozen=True)
class Rule:
    """What one setting accepts: `description` completes "must be ...", `example` a good value to suggest."""

    description: str
    example: str
    accepts: Callable[[Any], bool]
    nullable: bool = False
    hint: Callable[[str, Any], str | None] = lambda key, value: None  # a what-to-do fitting this wrong value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def integer(minimum: int, maximum: int | None = None, also: tuple[int, ...] = (), unit: str = "",
            nullable: bool = False, example: str | None = None) -> Rule:
    """An int (not a bool, not 2000.0) >= `minimum` (0 or 1; <= `maximum`), or one of the values in `also`;
    `example` is the value a refusal suggests (by default the smallest positive one)."""
    if unit:
        description = f"a {'positive' if minimum == 1 else 'non-negative'} number of {unit}"
    else:
        description = "a positive integer" if minimum == 1 else "a non-negative integer"
    if maximum is not None:
        description += f" up to {maximum}"
    description += "".join(f" or {v}" for v in also)

    def accepts(v: Any) -> bool:
        return _is_int(v) and (minimum <= v and (maximum is None or v <= maximum) or v in also)

    def hint(key: str, value: Any) -> str | None:  # 2000.0 or 1e3 meant as a count
        if isinstance(value, float) and value.is_integer() and accepts(int(value)):
            return f"write it without a decimal point or exponent: {key}={int(value)}"
        return None

    return Rule(description, example or str(max(minimum, 1)), accepts, nullable, hint)


def number(example: str, zero_allowed: bool = False, below: float | None = None, nullable: bool = False) -> Rule:
    """A finite int or float > 0 (>= 0 when `zero_allowed`), and < `below` if given."""
    if below is not None:
        description = f"a number in {'[' if zero_allowed else '('}0, {below:g})"
    else:
        description = "a number >= 0" if zero_allowed else "a positive number"
    return Rule(description, example,
                lambda v: _is_number(v) and (v >= 0 if zero_allowed else v > 0) and (below is None or v < below),
                nullable)


def _quote_hint(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        return f"quote it: {key}=\"'{_shown(value)}'\""
    return None


def text(example: str, nullable: bool = False, or_what: str = "", description: str = "a string") -> Rule:
    """A string; YAML makes `123`, `true` and `1e3` other types, so the hint shows how to quote them."""
    def hint(key: str, value: Any) -> str | None:
        quoted = _quote_hint(key, value)
        return quoted and quoted + (f", {or_what}" if or_what else "")
    return Rule(description, example, lambda v: isinstance(v, str), nullable, hint)


def choice(*values: str) -> Rule:
    return Rule("one of " + ", ".join(values), values[0], lambda v: isinstance(v, str) and v in values)


def one_of(*rules: Rule, nullable: bool = False) -> Rule:
    return Rule(" or ".join(r.description for r in rules), rules[0].example,
                lambda v: any(r.accepts(v) for r in rules), nullable)


BOOLEAN = Rule("true or false", "true", lambda v: isinstance(v, bool))
POSITIVE_INT = integer(1)
SEED = integer(0, maximum=2**32 - 1)  # the range Lightning's and NumPy's seeding accept
FRACTION = number("0.1", zero_allowed=True, below=1)
BETAS = Rule("two numbers in [0, 1)", "[0.9,0.99]",
             lambda v: isinstance(v, list) and len(v) == 2 and all(FRACTION.accepts(b) for b in v))
DEVICE_INDICES = Rule("a list of device indices", "[0]",
                      lambda v: isinstance(v, list) and bool(v) and all(_is_int(i) and i >= 0 for i in v))
TARGETS = Rule("a list of configs with _target_", "[]",
                lambda v: isinstance(v, list) and all(isinstance(c, dict) and "_target_" in c for c in v))
# Lightning's precisions less the plugin-only ones (transformer-engine), and `auto` (devices.auto_precision);
# YAML reads `32` as an int
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "auto", "bf16-true", "16-true", "64-true", "32", "16", "64",
              "bf16")
PRECISION = Rule("one of " + ", ".join(PRECISIONS), PRECISIONS[0],
                 lambda v: (isinstance(v, str) or _is_int(v)) and str(v) in PRECISIONS)

TRAIN_RULES: dict[str, Rule] = {
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
    "data.val_fraction": number("0.1", below=1),
    "data.block_size": POSITIVE_INT,
    "data.batch_size": POSITIVE_INT,
    "data.num_workers": integer(0),
    "data.eval_iters": integer(1, unit="batches"),
    "data.seed": SEED,
    "model.init_from": text("gpt2", nullable=True),
    "model.n_layer": POSITIVE_INT,
    "model.n_head": POSITIVE_INT,
    "model.n_embd": POSITIVE_INT,
    "model.dropout": FRACTION,
    "model.bias": BOOLEAN,
    "model.vocab_multiple": POSITIVE_INT,
    "model.fused_loss": BOOLEAN,
    "model.compile": BOOLEAN,
    "model.rotary": BOOLEAN,
    "model.norm": choice("layernorm", "rmsnorm"),
    "model.qk_norm": BOOLEAN,
    "model.mlp": choice("gelu", "gelu_tanh", "relu2"),
    "model.tie_embeddings": BOOLEAN,
    "model.logit_softcap": number("30", nullable=True),
    "model.zero_init": BOOLEAN,
    "model.value_embeddings": BOOLEAN,
    "model.trigram_buckets": integer(0, unit="buckets", example="8191"),
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
    "scheduler.cooldown": Rule("a number in (0, 1]", "0.5", lambda v: _is_number(v) and 0 < v <= 1),
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

SAMPLE_RULES: dict[str, Rule] = {
    "ckpt": text("latest"),
    "prompt": text("'To be'", or_what="or read it from a file: prompt=FILE:path.txt", description="text"),
    "num_samples": POSITIVE_INT,
    "max_new_tokens": integer(0, unit="tokens"),
    "temperature": number("0.8", zero_allowed=True),
    "top_k": integer(1, nullable=True),
    "seed": SEED,
    "device": choice("auto", "cpu", "mps", "cuda"),
    "precision": choice("run", "auto", "32-true", "bf16-mixed", "16-mixed"),
}

EVAL_RULES: dict[str, Rule] = {
    "ckpt": text("latest"),
    "split": one_of(choice("val", "train"), nullable=True),
    "text": text("FILE", nullable=True),
    "data_dir": text("DIR"),
    "format": choice("text", "json"),
    "device": choice("auto", "cpu", "mps", "cuda"),
    "batch_size": integer(1, unit="windows"),
}


EXPORT_RULES: dict[str, Rule] = {
    "ckpt": text("latest"),
    "out": text("DIR"),
}


def _shown(value: Any) -> str:
    """A value as it would be typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_shown, value)) + "]"
    return str(value)


_ABSENT, _MISSING = object(), object()


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved plain value at `key`; _MISSING for `???`; _ABSENT when the config has no such key, or
    the value only resolves inside a Hydra run (`${hydra:...}` with no Hydra config set)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent.keys():
        return _ABSENT
    if OmegaConf.is_missing(parent, leaf):
        return _MISSING
    try:
        value = parent[leaf]
    except OmegaConfBaseException as err:
        raw = OmegaConf.to_container(parent, resolve=False)[leaf]
        if "${hydra:" in str(raw) and not HydraConfig.initialized():
            return _ABSENT
        raise UserError(f"{key} cannot be resolved ({str(err).splitlines()[0]}), got {raw}; "
                        f"fix the interpolation or pass a value") from None
    if isinstance(value, (DictConfig, ListConfig)):  # e.g. a callback's node: its own keys are checked one by one
        only_in_a_run = not HydraConfig.initialized() and "${hydra:" in str(OmegaConf.to_container(value))
        return OmegaConf.to_container(value, resolve=not only_in_a_run)
    return value


def _check(cfg: DictConfig, rules: dict[str, Rule]) -> dict[str, Any]:
    """Every key of `rules` that `cfg` has, checked in table order; returns the resolved values."""
    values = {}
    for key, rule in rules.items():
        value = _value(cfg, key)
        if value is _ABSENT:
            continue
        if value is _MISSING:
            raise UserError(f"{key} must be set, got ???; pass {key}={rule.example}")
        if not (value is None and rule.nullable or value is not None and rule.accepts(value)):
            description = rule.description + (" or null" if rule.nullable else "")
            what_to_do = rule.hint(key, value) or f"pass e.g. {key}={rule.example}"
            raise UserError(f"{key} must be {description}, got {_shown(value)}; {what_to_do}")
        values[key] = value
    return values


def validate_train_config(cfg: DictConfig) -> None:
    """Refuse the first bad setting of a training config (conf/train.yaml composed), including the
    combinations: n_embd a multiple of n_head, warmup shorter than the decay. Registers the resolvers the
    values need, so any composed config can be checked."""
    register_resolvers()
    values = _check(cfg, TRAIN_RULES)
    n_embd, n_head = values.get("model.n_embd"), values.get("model.n_head")
    if n_embd is not None and n_head is not None and n_embd % n_head:
        raise UserError(f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head}); "
                        f"pass e.g. model.n_embd={math.ceil(n_embd / n_head) * n_head}")
    warmup, decay = values.get("scheduler.warmup_iters"), values.get("scheduler.lr_decay_iters")
    if values.get("scheduler.decay_lr", True) and warmup is not None and decay is not None and warmup >= decay:
        raise UserError(f"scheduler.warmup_iters must be below scheduler.lr_decay_iters ({decay}), got {warmup}; "
                        "pass a smaller scheduler.warmup_iters, a larger scheduler.lr_decay_iters, "
                        "or scheduler.decay_lr=false")


def validate_sample_config(cfg: DictConfig) -> None:
    """Refuse the first bad setting of a sampling config (conf/sample.yaml)."""
    _check(cfg, SAMPLE_RULES)


def validate_export_config(cfg: DictConfig) -> None:
    """Refuse the first bad setting of an export config (conf/export.yaml)."""
    _check(cfg, EXPORT_RULES)


def validate_eval_config(cfg: DictConfig) -> None:
    """Refuse the first bad setting of an evaluation config (conf/eval.yaml), or a split and a text together."""
    values = _check(cfg, EVAL_RULES)
    if values.get("split") is not None and values.get("text") is not None:
        raise UserError(f"split={values['split']} and text={values['text']} both name what to evaluate; pass one")
