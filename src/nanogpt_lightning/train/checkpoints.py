"""The one place that finds and reads this project's checkpoints, for resuming training and for sampling.

`resolve_checkpoint` turns what the user typed (a file, a run directory, `latest`) into a file;
`read_checkpoint` loads it, refusing anything that is not a whole nanogpt_lightning checkpoint;
`resume_path` checks it against the run about to start (model shapes, vocabulary, data, settings, progress).
Every problem is a one-line UserError.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanogpt_lightning.data.prepare import describe_data
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.model.gpt import GPTConfig

CHECKPOINT_KEY = "nanogpt_lightning"  # marks this project's checkpoints; holds what sampling needs
TIME_BUDGET_KEY = "TimeBudget"  # callbacks.TimeBudget's state among a checkpoint's callback states
# the model settings that give the weights their shapes; a resumed run must repeat them
SHAPE_SETTINGS = ("n_layer", "n_head", "n_embd", "bias", "vocab_multiple")


def resolve_checkpoint(spec: str | Path, key: str = "ckpt", runs_root: Path = Path("outputs")) -> Path:
    """A checkpoint file; a run directory means its last.ckpt; `latest` the newest last.ckpt under `runs_root`.

    `key` is the setting's name in the messages (`ckpt` for sampling, `ckpt_path` for training).
    """
    if str(spec) == "latest":
        candidates = list(runs_root.glob("**/last.ckpt"))
        if not candidates:
            raise UserError(f"no checkpoints under {runs_root}/; train a model first or pass {key}=PATH")
        return max(candidates, key=lambda p: p.stat().st_mtime)
    path = Path(spec).expanduser()
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            if (folder / "last.ckpt").is_file():
                return folder / "last.ckpt"
        found = sorted(p.name for folder in (path / "checkpoints", path) for p in folder.glob("*.ckpt"))
        holds = f"it holds {', '.join(found)}: pass {key}={path / 'checkpoints' / found[0]}" if found else (
            f"pass {key}=FILE.ckpt")
        raise UserError(f"no last.ckpt in {path}/checkpoints or {path}; {holds}")
    if not path.is_file():
        raise UserError(f"checkpoint {spec} does not exist; pass {key}=FILE.ckpt, a run directory or {key}=latest")
    return path


def read_checkpoint(path: Path, key: str = "ckpt") -> dict:
    """The checkpoint at `path`, its tensors memory-mapped (cheap: nothing is read until used).

    Loads only tensors and plain data (weights_only, as Lightning does for local files).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds (RuntimeError, UnpicklingError, ...)
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise UserError(f"cannot read checkpoint {path}, it is truncated or not a checkpoint ({reason}); "
                        f"pass {key}=FILE.ckpt written by scripts/train.py") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise UserError(f"{path} is not a nanogpt_lightning checkpoint; "
                        f"pass {key}=FILE.ckpt written by scripts/train.py")
    return checkpoint


def check_resumable(checkpoint: dict, model_config: GPTConfig, tokenizer: dict, path: Path) -> None:
    """Refuse to resume a checkpoint into a model of other shapes or on data with another vocabulary."""
    saved = checkpoint[CHECKPOINT_KEY]["model_config"]
    ours = vars(model_config)
    differ = [name for name in SHAPE_SETTINGS if saved.get(name) != ours[name]]
    if differ:
        was = ", ".join(f"model.{name}={saved.get(name)}" for name in differ)
        now = ", ".join(f"{ours[name]}" for name in differ)
        raise UserError(f"checkpoint {path} was trained with {was} (this run has {now}); "
                        "resume with the same model.* settings or start a new run without ckpt_path")
    if saved["block_size"] != model_config.block_size:
        if model_config.block_size > saved["block_size"]:
            why = "larger than the checkpoint's"
        else:
            why = "not the checkpoint's"
        raise UserError(f"data.block_size={model_config.block_size} is {why} block size {saved['block_size']} "
                        f"(checkpoint {path}); resume with data.block_size={saved['block_size']}")
    saved_tokenizer = checkpoint[CHECKPOINT_KEY]["tokenizer"]
    if saved["vocab_size"] != model_config.vocab_size or saved_tokenizer != tokenizer:
        raise UserError(
            f"checkpoint {path} was trained on a {saved_tokenizer.get('kind')} vocabulary of {saved['vocab_size']} "
            f"tokens, the data here has a {tokenizer.get('kind')} vocabulary of {model_config.vocab_size}; "
            "resume with the same data.* settings (text and tokenizer) or start a new run")


def trained_on(checkpoint: dict) -> str:
    """The data a checkpoint was trained on, for messages (checkpoints from before the record have none)."""
    data = checkpoint[CHECKPOINT_KEY].get("data")
    return describe_data(data) if data else "data not recorded (an older checkpoint)"


def check_same_data(checkpoint: dict, data: dict, path: Path) -> None:
    """Refuse to resume on data other than the checkpoint's (checkpoints that predate the record pass)."""
    saved = checkpoint[CHECKPOINT_KEY].get("data")
    if saved and saved != data:
        raise UserError(f"checkpoint {path} was trained on {describe_data(saved)}, this run's data is "
                        f"{describe_data(data)}; resume with the same data.* settings, or pass allow_other_data=true "
                        "to go on training on this data")


def check_same_settings(checkpoint: dict, settings: dict, path: Path, may_change: tuple[str, ...]) -> None:
    """Refuse to resume with a setting that shapes the result changed: it would not apply (Lightning restores
    the optimizer and schedule state) and the run's records would say it did.

    A setting the checkpoint does not know was added to the project after it was written, and has a default
    that keeps the old behaviour: not compared (the model's shape is, by check_resumable)."""
    saved = checkpoint[CHECKPOINT_KEY].get("settings")
    if not saved:
        return
    differ = [key for key in sorted(saved)
              if key not in may_change and saved.get(key) != settings.get(key)]
    if differ:
        changes = ", ".join(f"{key}={settings.get(key)} (checkpoint: {saved.get(key)})" for key in differ)
        raise UserError(f"checkpoint {path} was trained with other settings: {changes}; resume with the "
                        "checkpoint's settings, or start a new run (its weights cannot carry over)")


def seconds_trained(checkpoint: dict) -> float:
    """The seconds of training a time-budgeted run had used (callbacks.TimeBudget's state; 0 without a budget)."""
    return checkpoint.get("callbacks", {}).get(TIME_BUDGET_KEY, {}).get("seconds_used", 0.0)


def resume_path(spec: str | None, module, max_steps: int, budget_s: float | None, allow_other_data: bool,
                may_change: tuple[str, ...]) -> Path | None:
    """The checkpoint file a `ckpt_path=` setting names, checked against the run about to start (`module`,
    a GPTModule): same shapes and vocabulary, same data unless allowed, same settings, not already done
    (its iterations, or under a time budget its seconds)."""
    if spec is None:
        return None
    path = resolve_checkpoint(spec, key="ckpt_path")
    checkpoint = read_checkpoint(path, key="ckpt_path")
    check_resumable(checkpoint, module.model_config, module.tokenizer, path)
    if not allow_other_data:
        check_same_data(checkpoint, module.data, path)
    check_same_settings(checkpoint, module.run_settings, path, may_change)
    step = checkpoint.get("global_step", 0)
    if budget_s is not None:
        used = seconds_trained(checkpoint)
        if used >= budget_s:
            raise UserError(f"the run of {path} is already complete: it trained {used:.1f}s of budget_s={budget_s:g}; "
                            "pass a larger budget_s to train further")
    elif step >= max_steps:
        raise UserError(f"the run of {path} is already complete: it reached iteration {step} of "
                        f"trainer.max_steps={max_steps}; pass a larger trainer.max_steps to train further")
    return path
