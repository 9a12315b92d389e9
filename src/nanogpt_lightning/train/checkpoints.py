"""The one place that finds, reads and loads model weights: this project's checkpoints and GPT-2's.

`resolve_checkpoint` turns what the user typed (a file, a run directory, `latest`) into a file;
`read_checkpoint` loads it, refusing anything that is not a whole nanogpt_lightning checkpoint;
`load_model` gives the model that `ckpt=` names (a checkpoint, or pretrained GPT-2 weights from a directory or
the Hugging Face hub, mapped by model/gpt2.py), for sampling, evaluation and export; `init_from` does the same
for training's `model.init_from`; the `check_*` functions hold a checkpoint against the run about to resume
it (model shapes, vocabulary, data, settings; train/run.resume_path). Every problem is a one-line UserError;
those about the setting that names the weights say `ckpt` (sampling's, evaluation's, export's), and training
names its own (`ckpt_path`, `model.init_from`) with errors.naming.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch

from nanogpt_lightning.console import say
from nanogpt_lightning.data.prepare import describe_data
from nanogpt_lightning.data.tokenizer import Tokenizer, tokenizer_from_meta
from nanogpt_lightning.errors import SettingError, UserError, first_line, naming
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.model.gpt2 import GPT2_EOS, check_gpt2_options, gpt_config, load_weights

CHECKPOINT_KEY = "nanogpt_lightning"  # marks this project's checkpoints; holds what sampling needs
# the layout of what CHECKPOINT_KEY holds, recorded as its `format_version` (checkpoints from before the record:
# 0); a newer version that changes the layout raises it, and this one refuses what it cannot read
FORMAT_VERSION = 1
# the model settings that give the weights their shapes; a resumed run must repeat them
SHAPE_SETTINGS = ("n_layer", "n_head", "n_embd", "bias", "vocab_multiple")


def resolve_checkpoint(spec: str | Path, runs_root: Path = Path("outputs")) -> Path:
    """A checkpoint file; a run directory means its last.ckpt; `latest` the newest last.ckpt under `runs_root`."""
    if str(spec) == "latest":
        candidates = list(runs_root.glob("**/last.ckpt"))
        if not candidates:
            raise SettingError(lambda key="ckpt": f"no checkpoints under {runs_root}/; train a model first or "
                               f"pass {key}=PATH")
        return max(candidates, key=lambda p: p.stat().st_mtime)
    path = Path(spec).expanduser()
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            if (folder / "last.ckpt").is_file():
                return folder / "last.ckpt"
        found = sorted(p.name for folder in (path / "checkpoints", path) for p in folder.glob("*.ckpt"))
        raise SettingError(lambda key="ckpt": f"no last.ckpt in {path}/checkpoints or {path}; " + (
            f"it holds {', '.join(found)}: pass {key}={path / 'checkpoints' / found[0]}" if found
            else f"pass {key}=FILE.ckpt"))
    if not path.is_file():
        raise SettingError(lambda key="ckpt": f"checkpoint {spec} does not exist; pass {key}=FILE.ckpt, a run "
                           f"directory or {key}=latest")
    return path


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, its tensors memory-mapped (cheap: nothing is read until used).

    Loads only tensors and plain data (weights_only, as Lightning does for local files).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds (RuntimeError, UnpicklingError, ...)
        reason = first_line(err)
        raise SettingError(lambda key="ckpt": f"cannot read checkpoint {path}, it is truncated or not a checkpoint "
                           f"({reason}); pass {key}=FILE.ckpt written by scripts/train.py") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(CHECKPOINT_KEY), dict):
        raise SettingError(lambda key="ckpt": f"{path} is not a nanogpt_lightning checkpoint; "
                           f"pass {key}=FILE.ckpt written by scripts/train.py")
    meta = checkpoint[CHECKPOINT_KEY]
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} was written by a newer version of nanogpt-lightning (format {version}, "
                        f"this one reads up to {FORMAT_VERSION}): upgrade nanogpt-lightning")
    missing = [name for name, holder in (("state_dict", checkpoint), ("model_config", meta), ("tokenizer", meta))
               if not isinstance(holder.get(name), dict)]
    if missing:
        raise SettingError(lambda key="ckpt": f"checkpoint {path} lacks its {', '.join(missing)} (damaged, or not "
                           f"written by scripts/train.py); pass {key}=FILE.ckpt written by scripts/train.py")
    return checkpoint


def checkpoint_model(checkpoint: dict, path: Path) -> GPT:
    """The GPT the checkpoint at `path` describes, its weights loaded; an unknown model setting (as a newer
    version writes), a refused value, or a weight added, missing or of another shape is one line."""
    saved = checkpoint[CHECKPOINT_KEY]["model_config"]
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise UserError(f"checkpoint {path} has model settings this version does not know ({', '.join(unknown)}): "
                        "it was written by a newer version; upgrade nanogpt-lightning")
    try:
        model = GPT(GPTConfig(**saved))
    except (TypeError, ValueError) as err:
        raise UserError(f"checkpoint {path} has a model config this version cannot build ({first_line(err)}); "
                        "pass a checkpoint written by scripts/train.py") from None
    prefix = "model."
    weights = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    ours = model.state_dict()
    problems = [f"{name} missing" for name in ours if name not in weights]
    problems += [f"{name} unexpected" for name in weights if name not in ours]
    problems += [f"{name} is {tuple(weights[name].shape)}, the model's {tuple(tensor.shape)}"
                 for name, tensor in ours.items() if name in weights and weights[name].shape != tensor.shape]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise UserError(f"checkpoint {path}: its weights do not fit its model config "
                        f"({'; '.join(problems[:3])}{more}); pass a checkpoint written by scripts/train.py")
    model.load_state_dict(weights)
    return model


def load_checkpoint(path: Path, device: torch.device) -> tuple[GPT, Tokenizer, dict]:
    """The model of the checkpoint at `path` (eval mode, on `device`), its tokenizer, and the raw checkpoint."""
    checkpoint = read_checkpoint(path)
    model = checkpoint_model(checkpoint, path)
    return model.to(device).eval(), tokenizer_from_meta(checkpoint[CHECKPOINT_KEY]["tokenizer"]), checkpoint


def load_model(spec: str, device: torch.device) -> tuple[GPT, Tokenizer, dict, Path]:
    """What `ckpt=spec` names: a checkpoint (see resolve_checkpoint) or pretrained weights (is_pretrained).

    Returns the model (eval mode, on `device`), its tokenizer, its checkpoint (for pretrained weights one that
    holds their model config, tokenizer and name, `pretrained`) and its file (pretrained: their directory)."""
    if spec != "latest" and is_pretrained(spec):
        pretrained = read_pretrained(spec)
        named = f"ckpt={spec}"
        model = load_weights(GPT(gpt_config(pretrained.hf_config, named)), pretrained.tensors, named).eval()
        meta = pretrained_tokenizer(pretrained, model.config.vocab_size)
        checkpoint = {CHECKPOINT_KEY: {"model_config": asdict(model.config), "tokenizer": meta, "pretrained": spec}}
        return model.to(device), tokenizer_from_meta(meta), checkpoint, pretrained.directory
    path = resolve_checkpoint(spec)
    return *load_checkpoint(path, device), path


def title(path: Path, checkpoint: dict) -> str:
    """A model for messages: `PATH (step N)`, `pretrained gpt2 (DIR)`, or `pretrained DIR`."""
    pretrained = checkpoint[CHECKPOINT_KEY].get("pretrained")
    if not pretrained:
        return f"{path} (step {checkpoint.get('global_step', '?')})"
    return f"pretrained {pretrained}" + (f" ({path})" if Path(pretrained).expanduser() != path else "")


def describe_origin(checkpoint: dict) -> str:
    """`trained on ...` for a checkpoint; pretrained weights were trained elsewhere."""
    if checkpoint[CHECKPOINT_KEY].get("pretrained"):
        return "trained on data not recorded (pretrained weights, not a checkpoint)"
    return f"trained on {trained_on(checkpoint)}"


# GPT-2 weights: `model.init_from=` / `ckpt=` gpt2|gpt2-medium|gpt2-large|gpt2-xl|DIR, as save_pretrained or
# scripts/export.py write them (config.json and model.safetensors, or pytorch_model.bin)
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's four models on the Hugging Face hub
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first one a directory holds is read
TOKENIZER_META_FILE = "nanogpt_tokenizer.json"  # an export's tokenizer as this project describes it


def is_pretrained(spec: str) -> bool:
    """Whether `spec` names pretrained weights: one of GPT2_NAMES, or a directory holding config.json."""
    return spec in GPT2_NAMES or (Path(spec).expanduser() / CONFIG_FILE).is_file()


def _from_hub(name: str) -> Path:
    """The hub snapshot directory of `name` with its config and safetensors weights: the local cache, else
    a download; neither: one line that says how to get them."""
    from huggingface_hub import constants, hf_hub_download  # only where GPT-2 is asked for: it loads requests
    from huggingface_hub.errors import LocalEntryNotFoundError

    files = (CONFIG_FILE, WEIGHT_FILES[0])
    try:
        return Path([hf_hub_download(name, f, local_files_only=True) for f in files][-1]).parent
    except LocalEntryNotFoundError:
        pass
    say(f"{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}): downloading it from the hub",
        file=sys.stderr)

    def cannot_get(reason: str) -> SettingError:
        return SettingError(lambda key="ckpt": f"cannot get {key}={name}: it is not in the Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) and downloading it failed ({reason}); download it where "
                            f"there is network with `hf download {name} {' '.join(files)}` (older huggingface_hub: "
                            f"huggingface-cli download ...), or pass {key}=DIR, a directory holding "
                            f"{' and '.join(files)}")

    if not constants.HF_HUB_OFFLINE and (unreachable := _unreachable(constants.ENDPOINT)):
        raise cannot_get(unreachable)  # at once: the download would retry for half a minute first
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # no retry notices: the one line below says what happened
    try:
        return Path([hf_hub_download(name, f) for f in files][-1]).parent
    except Exception as err:  # noqa: BLE001 - no network, offline mode, a proxy: all end the same way
        while err.__cause__ or err.__context__:  # the root of it (no network: the connection's error)
            err = err.__cause__ or err.__context__
        raise cannot_get(first_line(err, 120)) from None
    finally:
        hub_log.setLevel(level)


HUB_CONNECT_S = 5  # to open a connection to the hub; no retries


def _unreachable(endpoint: str) -> str | None:
    """Why the hub at `endpoint` cannot be reached (its name does not resolve, no connection within
    HUB_CONNECT_S), or None when it can, or through a proxy, which only the download itself can try."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_CONNECT_S).close()
    except OSError as err:
        return first_line(err, 120)
    return None


def locate(spec: str) -> Path:
    """The directory holding the config and weights that `spec` names (see is_pretrained)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
            raise SettingError(lambda key="ckpt": f"{key}={spec}: the directory must hold {CONFIG_FILE} and "
                               f"{' or '.join(WEIGHT_FILES)} (as save_pretrained or scripts/export.py write them)")
        return path
    if spec in GPT2_NAMES:
        return _from_hub(spec)
    raise SettingError(lambda key="ckpt": f"{key}={spec} is neither a directory nor one of {', '.join(GPT2_NAMES)}; "
                       f"pass one of those, or a directory holding {CONFIG_FILE} and {WEIGHT_FILES[0]}")


@dataclass
class Pretrained:
    """Weights read from `directory`: its config.json (`hf_config`) and tensors in the file's own names."""

    spec: str
    directory: Path
    hf_config: dict
    tensors: dict[str, torch.Tensor]


def read_pretrained(spec: str) -> Pretrained:
    """The config and weights that `spec` names, read (safetensors, or a weights-only torch.load)."""
    directory = locate(spec)
    try:
        hf_config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"cannot read {directory / CONFIG_FILE} ({first_line(err)}); pass a directory written by "
                        "save_pretrained or scripts/export.py") from None
    try:
        weights = next(directory / f for f in WEIGHT_FILES if (directory / f).is_file())
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file  # only where such weights are read

            tensors = load_file(weights)
        else:
            tensors = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - json, safetensors and torch.load each raise their own kinds
        reason = first_line(err)
        raise SettingError(lambda key="ckpt": f"cannot read the weights of {key}={spec} in {directory} ({reason}); "
                           "pass a directory written by save_pretrained or scripts/export.py") from None
    if not isinstance(hf_config, dict):
        raise SettingError(lambda key="ckpt": f"{key}={spec}: {directory / CONFIG_FILE} is not a JSON object (got "
                           f"{type(hf_config).__name__}); pass a directory written by save_pretrained or "
                           "scripts/export.py")
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise SettingError(lambda key="ckpt": f"{key}={spec} is a {hf_config['model_type']} model, not GPT-2; "
                           "pass GPT-2 weights")
    return Pretrained(spec, directory, hf_config, tensors)


def pretrained_tokenizer(pretrained: Pretrained, vocab_size: int) -> dict:
    """The tokenizer description of pretrained weights: an export's own (a character vocabulary), else GPT-2's."""
    meta_file = pretrained.directory / TOKENIZER_META_FILE
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(f"cannot read {meta_file} ({first_line(err)}); export the checkpoint again") from None
        chars = meta.get("chars") if isinstance(meta, dict) else None
        if isinstance(meta, dict) and meta.get("kind") == "gpt2" and vocab_size == GPT2_EOS + 1:
            return meta
        if not isinstance(meta, dict) or meta.get("kind") != "char" or not isinstance(chars, str) or len(
                set(chars)) != len(chars):
            raise UserError(f"{meta_file} is not a tokenizer description (a character list or GPT-2's); "
                            "export the checkpoint again")
        if len(chars) != vocab_size:
            raise UserError(f"{meta_file} has {len(chars)} characters, the model's vocab_size is {vocab_size}; "
                            "export the checkpoint again")
        return meta
    if vocab_size == GPT2_EOS + 1:
        return {"kind": "gpt2", "vocab_size": GPT2_EOS + 1}
    raise UserError(f"ckpt={pretrained.spec} has a vocabulary of {vocab_size} tokens, not GPT-2's, and no "
                    f"{TOKENIZER_META_FILE}; use the checkpoint it was exported from")


def init_from(spec: str, tokenizer: dict, block_size: int,
              model_settings: dict) -> tuple[GPTConfig, Callable[[GPT], None]]:
    """Training's model config for `model.init_from=spec` on data with `tokenizer` and `block_size`, and the
    function that loads the weights into a model built from it. What the data needs of the weights (vocabulary,
    positions, options) is checked here, their shapes by the loader: all before training starts.

    `spec` names GPT-2 weights (is_pretrained) or a checkpoint of this project (a file, a run directory,
    `latest`: its weights only, the optimizer and schedule start afresh). The shape and options come from the
    weights; of the model settings only dropout and fused_loss apply; an option GPT-2 lacks is refused."""
    if not is_pretrained(spec):
        return _init_from_checkpoint(spec, tokenizer, block_size, model_settings)
    key = "model.init_from"
    named = f"{key}={spec}"
    if tokenizer.get("kind") != "gpt2":
        raise UserError(f"{named} needs data in GPT-2's byte-pair encoding, this data is "
                        f"{tokenizer.get('kind')}-level; pass data.tokenizer=gpt2 (e.g. data=shakespeare)")
    check_gpt2_options(model_settings, named)
    with naming(key=key):
        pretrained = read_pretrained(spec)
    config = gpt_config(pretrained.hf_config, named, block_size, dropout=model_settings.get("dropout", 0.0),
                        fused_loss=model_settings.get("fused_loss", True))
    if config.vocab_size <= GPT2_EOS:  # GPT-2's token ids would index past its embedding table
        raise UserError(f"{named} has a vocabulary of {config.vocab_size} tokens, the data is in GPT-2's byte-pair "
                        f"encoding of {GPT2_EOS + 1}; pass weights with GPT-2's whole vocabulary (e.g. "
                        f"{key}=gpt2), or train from scratch without {key}")
    positions = pretrained.hf_config["n_positions"]
    cropped = f", positions cropped to {block_size}" if block_size < positions else ""
    say(f"init_from {spec} ({pretrained.directory}): {config.n_layer} layers, {config.n_head} heads, "
        f"n_embd {config.n_embd}, {positions} positions{cropped}")
    return config, lambda model: load_weights(model, pretrained.tensors, named)


def _init_from_checkpoint(spec: str, tokenizer: dict, block_size: int,
                          model_settings: dict) -> tuple[GPTConfig, Callable[[GPT], None]]:
    """init_from for a checkpoint of this project: its model, on data of its vocabulary, positions cropped."""
    key = "model.init_from"
    named = f"{key}={spec}"
    with naming(key=key):
        path = resolve_checkpoint(spec)
        checkpoint = read_checkpoint(path)
    trained = checkpoint_model(checkpoint, path)
    saved = checkpoint[CHECKPOINT_KEY]["tokenizer"]
    if saved != tokenizer:
        raise UserError(f"{named} was trained on {vocabulary(saved)}, the data here has {vocabulary(tokenizer)}; "
                        f"train on data of the checkpoint's tokenizer and text, or train from scratch without {key}")
    if block_size > trained.config.block_size:
        raise UserError(f"data.block_size={block_size} is larger than the {trained.config.block_size} positions "
                        f"of {named}; pass data.block_size={trained.config.block_size} or less")
    config = replace(trained.config, block_size=block_size, dropout=model_settings.get("dropout", 0.0),
                     fused_loss=model_settings.get("fused_loss", True))
    weights = trained.state_dict()
    if "transformer.wpe.weight" in weights:
        weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][:block_size]
    cropped = f", positions cropped to {block_size}" if block_size < trained.config.block_size else ""
    say(f"init_from {title(path, checkpoint)}: {config.n_layer} layers, {config.n_head} heads, n_embd "
        f"{config.n_embd}{cropped}; a fresh optimizer and schedule")
    return config, lambda model: model.load_state_dict(weights)


def vocabulary(tokenizer: dict) -> str:
    """A tokenizer description for messages: `a char vocabulary of 65 tokens`."""
    return f"a {tokenizer.get('kind')} vocabulary of {tokenizer.get('vocab_size')} tokens"


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

    Keys are compared on both sides. A key only this run has is a setting added to the project after the
    checkpoint was written, whose default keeps the old behaviour: not a difference (the model's shape is
    checked by check_resumable), unless its group was switched (`optimizer._target_` differs, e.g. AdamW ->
    Muon): then every key the new group brings is one. A checkpoint that predates the record of the groups'
    `_target_` (no `optimizer._target_`) resumes: its target is not compared; one without any record resumes
    with a warning that nothing could be compared."""
    saved = checkpoint[CHECKPOINT_KEY].get("settings")
    if not saved:
        say(f"warning: checkpoint {path} records no settings (an older version wrote it): this resume cannot "
            "check that the settings are the run's; resume with the settings it was trained with", file=sys.stderr)
        return
    switched = {key.removesuffix("._target_") for key in saved
                if key.endswith("._target_") and key in settings and saved[key] != settings[key]}
    keys = set(saved) | {key for key in settings if key.rpartition(".")[0] in switched}
    differ = [key for key in sorted(keys, key=lambda k: (not k.endswith("._target_"), k))
              if key not in may_change and saved.get(key) != settings.get(key)]
    if differ:
        changes = ", ".join(f"{key}={settings.get(key)} (checkpoint: {saved.get(key)})" for key in differ)
        raise UserError(f"checkpoint {path} was trained with other settings: {changes}; resume with the "
                        "checkpoint's settings, or start a new run from its weights with the new settings: "
                        f"model.init_from={path} (a fresh optimizer and schedule, the same model shape)")
