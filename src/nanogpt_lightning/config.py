"""The rules settings follow, and the checks of the sampling, evaluation and export configs.

Each knob has one rule (a Rule), so a bad value is refused before anything is built or downloaded, in one
line that names the key: `optimizer.lr must be a positive number, got 0`. Values are checked as YAML typed
them, after interpolations resolve: `abc` is a string, `true` a bool (never an integer), `1e3` a float.
The training config's table and checks are train/settings.py's (the model's rules are GPTConfig's fields,
model/config.py); this module imports neither (the base imports nothing above it).
"""

from __future__ import annotations

import functools
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanogpt_lightning.console import say
from nanogpt_lightning.errors import UserError

CONF_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")


# Hydra's plugins, by the config options they add, and the extra of pyproject.toml that installs each
PLUGIN_EXTRAS = {"submitit_slurm": "slurm", "submitit_local": "slurm", "joblib": "sweeps", "optuna": "sweeps"}


def _options_holding(key: str) -> list[str]:
    """The options of the config group that `key` starts with whose file sets the rest of it, e.g.
    `optimizer=muon` for `optimizer.momentum`."""
    group, _, rest = key.partition(".")
    files = sorted(Path(CONF_DIR, group).glob("*.yaml")) if rest else []
    return [f"{group}={path.stem}" for path in files if OmegaConf.select(OmegaConf.load(path), rest) is not None]


def hydra_error_line(err: Exception) -> str:
    """Hydra's error about the command line (an override it cannot apply, an option its group lacks, a
    launcher or sweeper whose plugin is not installed), in one line that says what to do; Hydra prints
    six to twelve lines, with its search path and a tip about HYDRA_FULL_ERROR."""
    text = str(err)
    first = (text.splitlines() or [""])[0]
    started = Path(sys.argv[0])  # scripts/train.py, prepare.py, ...; else (a test, a notebook) the training
    script = f"python scripts/{started.name if started.parent.name == 'scripts' else 'train.py'}"
    if match := re.match(r"Could not override '(.+)'\.", first):
        key = match.group(1)
        holders = _options_holding(key)
        if holders:
            return (f"{key} is not a setting of the {key.partition('.')[0]} chosen, {' and '.join(holders)} has it; "
                    f"pass {holders[0]} too, or drop {key}")
        append = re.search(r"use (\+\S+)", text)
        return (f"{key} is not a setting; check its spelling (`{script} --cfg job` shows every setting), or add a "
                f"key of your own with {append.group(1) if append else '+' + key}")
    if match := re.search(r"In '(.+)': Could not (?:find|load) '(.+)/([^/']+)'", first):
        including, group, name = match.groups()
        if name in PLUGIN_EXTRAS:
            chosen = including.rpartition("/")[2] if including.startswith(group) else name
            return (f"{group}={chosen} needs Hydra's {name} plugin, which is not installed: "
                    f"pip install -e '.[{PLUGIN_EXTRAS[name]}]'")
        options = re.findall(r"^\t(\S+)$", text.partition("Config search path")[0], re.M)
        return f"{group}={name} is not an option of {group}; pass one of: {', '.join(options)}"
    if match := re.match(r"Ambiguous value for argument '(.+?)=(.*)'", first):
        key, value = match.groups()
        return (f"{key}={value}: a comma makes it a list or a sweep; to pass it as text quote it: "
                f"\"{key}='{value}'\" (a sweep needs -m)")
    if isinstance(err, OverrideParseException):
        return (f"cannot read an override ({first}); quote values holding spaces, commas or brackets: "
                "\"key='a value'\" (https://hydra.cc/docs/advanced/override_grammar/basic/)")
    return first


def hydra_main(config_name: str):
    """hydra.main for the scripts (conf/`config_name`.yaml): Hydra's errors about the command line are one line
    (hydra_error_line) and exit status 1."""
    from hydra._internal import utils as hydra_utils  # private: where Hydra prints its errors, in many lines

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        hydra_task = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(task)
        report = hydra_utils.run_and_report

        def run_and_report(func):
            def one_line():
                try:
                    return func()
                except (ConfigCompositionException, OverrideParseException) as err:
                    say(f"error: {hydra_error_line(err)}", file=sys.stderr)
                    sys.exit(1)
            return report(one_line)

        @functools.wraps(task)
        def main():
            hydra_utils.run_and_report = run_and_report
            try:
                return hydra_task()
            finally:
                hydra_utils.run_and_report = report

        return main

    return decorate


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use, e.g. `${multiply:${eval_interval},${trainer.accumulate_grad_batches}}`;
    needed before their values resolve. Safe to call more than once."""
    if not OmegaConf.has_resolver("multiply"):
        OmegaConf.register_new_resolver("multiply", lambda a, b: a * b)


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
PORTION = Rule("a number in (0, 1]", "0.5", lambda v: _is_number(v) and 0 < v <= 1)
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
    "overwrite": BOOLEAN,
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


ABSENT = object()  # a key the config lacks (None is a value a key holds): _value's answer, OmegaConf.select's default
_MISSING = object()


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved plain value at `key`; _MISSING for `???`; ABSENT when the config has no such key, or
    the value only resolves inside a Hydra run (`${hydra:...}` with no Hydra config set)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent.keys():
        return ABSENT
    if OmegaConf.is_missing(parent, leaf):
        return _MISSING
    try:
        value = parent[leaf]
    except OmegaConfBaseException as err:
        raw = OmegaConf.to_container(parent, resolve=False)[leaf]
        if "${hydra:" in str(raw) and not HydraConfig.initialized():
            return ABSENT
        raise UserError(f"{key} cannot be resolved ({str(err).splitlines()[0]}), got {raw}; "
                        f"fix the interpolation or pass a value") from None
    if isinstance(value, (DictConfig, ListConfig)):  # e.g. a callback's node: its own keys are checked one by one
        only_in_a_run = not HydraConfig.initialized() and "${hydra:" in str(OmegaConf.to_container(value))
        return OmegaConf.to_container(value, resolve=not only_in_a_run)
    return value


def refusal(key: str, rule: Rule, value: Any) -> str | None:
    """The one-line refusal of `value` for the setting `key` under `rule`, or None when the rule accepts it.
    The checks of configs (check_settings) and of GPTConfig built in Python (model/config.py) both say this."""
    if value is None and rule.nullable or value is not None and rule.accepts(value):
        return None
    description = rule.description + (" or null" if rule.nullable else "")
    what_to_do = rule.hint(key, value) or f"pass e.g. {key}={rule.example}"
    return f"{key} must be {description}, got {_shown(value)}; {what_to_do}"


def check_settings(cfg: DictConfig, rules: dict[str, Rule]) -> dict[str, Any]:
    """Every key of `rules` that `cfg` has, checked in table order; returns the resolved values."""
    values = {}
    for key, rule in rules.items():
        value = _value(cfg, key)
        if value is ABSENT:
            continue
        if value is _MISSING:
            raise UserError(f"{key} must be set, got ???; pass {key}={rule.example}")
        message = refusal(key, rule, value)
        if message is not None:
            raise UserError(message)
        values[key] = value
    return values


def validate_sample_config(cfg: DictConfig) -> None:
    """Refuse the first bad setting of a sampling config (conf/sample.yaml)."""
    check_settings(cfg, SAMPLE_RULES)


def validate_export_config(cfg: DictConfig) -> None:
    """Refuse the first bad setting of an export config (conf/export.yaml), or an empty out (the current
    directory is never an export's)."""
    values = check_settings(cfg, EXPORT_RULES)
    if values.get("out") is not None and not values["out"].strip():
        raise UserError("out is empty; pass out=DIR, a new directory to write the export into")


def validate_eval_config(cfg: DictConfig) -> None:
    """Refuse the first bad setting of an evaluation config (conf/eval.yaml), or a split and a text together."""
    values = check_settings(cfg, EVAL_RULES)
    if values.get("split") is not None and values.get("text") is not None:
        raise UserError(f"split={values['split']} and text={values['text']} both name what to evaluate; pass one")


def checked_settings(cfg: DictConfig, validate: Callable[[DictConfig], None]) -> dict[str, Any]:
    """The settings a script passes on: `cfg` resolved once (interpolations such as `${num_samples}` or
    `${oc.env:HOME}` become their values), checked by `validate`, and returned as the plain dict that was
    checked, so what runs is what the check saw. Hydra's own keys (`hydra`, `defaults`) are not settings."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        validate(cfg)  # names the setting whose interpolation fails
        raise UserError(f"a setting cannot be resolved ({str(err).splitlines()[0]}); "
                        "fix the interpolation or pass a value") from None
    resolved = OmegaConf.create(values)
    validate(resolved)
    return {key: value for key, value in values.items() if key not in ("hydra", "defaults")}
