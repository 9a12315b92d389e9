"""Evaluate a checkpoint over a whole text: loss, perplexity and bits per byte (the body of scripts/eval.py).

The pass is exact and deterministic, not the random batches of training's evaluation: the tokens are cut into
non-overlapping windows of block_size + 1 tokens stepping by block_size (the last one may be shorter), so every
token after the first is predicted exactly once, from the context since the start of its window. The loss is
the model's own (as training computes it), summed over every predicted token and divided by their number.

Bits per byte divides by the UTF-8 bytes of exactly the predicted tokens, so models with different tokenizers
can be compared on the same text.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from tqdm import tqdm

from nanogpt_lightning.data.prepare import TOKEN_DTYPE, Source, damage, describe_data, identity_of, prepare_command
from nanogpt_lightning.data.tokenizer import Tokenizer, UnknownCharactersError
from nanogpt_lightning.devices import pick_device
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.files import read_user_text
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.train.checkpoints import CHECKPOINT_KEY, describe_origin, load_model, title

WINDOWS = ("non-overlapping windows of block_size+1 = {n} tokens stepping by {block}: every token after the "
           "first predicted once, with the context since its window start")


@dataclass(frozen=True)
class Measure:
    """The numbers of one pass; `tokens` and `bytes` count the predicted tokens only."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    seconds: float


def token_bytes(tokenizer: Tokenizer, ids: np.ndarray) -> int:
    """The UTF-8 bytes of the tokens `ids` (each decoded alone: a BPE token may hold part of a character)."""
    return int(np.asarray(tokenizer.byte_lengths(), dtype=np.int64)[ids].sum())


@torch.no_grad()
def loss_sum(model: GPT, tokens: np.ndarray, batch_size: int) -> float:
    """The summed loss of every token after the first, over the windows the module docstring describes.

    A pass over a large split takes minutes: on a terminal, a progress bar (on stderr, gone when done); a log
    file or a pipe gets no bar, only the result lines."""
    block = model.config.block_size
    device = next(model.parameters()).device
    n_predicted = len(tokens) - 1
    n_full = n_predicted // block
    total = 0.0
    bar = tqdm(total=n_predicted, desc="evaluating", unit="token", unit_scale=True, leave=False,
               disable=not sys.stderr.isatty())

    def add(windows: np.ndarray) -> None:
        nonlocal total
        batch = torch.from_numpy(windows.astype(np.int64)).to(device)
        _, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
        total += loss.double().item() * (batch.size(0) * (batch.size(1) - 1))
        bar.update(batch.size(0) * (batch.size(1) - 1))

    offsets = np.arange(block + 1)
    with bar:
        for first in range(0, n_full, batch_size):
            starts = np.arange(first, min(first + batch_size, n_full)) * block
            add(tokens[starts[:, None] + offsets])
        if n_predicted % block:
            add(np.asarray(tokens[n_full * block:])[None, :])
    return total


def measure(model: GPT, tokenizer: Tokenizer, tokens: np.ndarray, batch_size: int = 16) -> Measure:
    """Loss (mean nats per predicted token), perplexity exp(loss) and bits per byte of `tokens` (at least 2)."""
    start = time.perf_counter()
    n_predicted = len(tokens) - 1
    loss = loss_sum(model, tokens, batch_size) / n_predicted
    n_bytes = token_bytes(tokenizer, np.asarray(tokens[1:], dtype=np.int64))
    return Measure(loss=loss, perplexity=math.exp(loss), bits_per_byte=loss / math.log(2) * n_predicted / n_bytes,
                   tokens=n_predicted, bytes=n_bytes, seconds=time.perf_counter() - start)


def text_tokens(path: str, tokenizer: Tokenizer) -> np.ndarray:
    """The tokens of the UTF-8 file at `path`, refused in one line if unreadable or not encodable."""
    file = Path(path).expanduser()
    content = read_user_text(file, "the text file", "pass text=FILE, a UTF-8 text file")
    try:
        ids = tokenizer.encode(content)
    except UnknownCharactersError as err:
        raise UserError(f"this character-level model cannot encode {file} ({err}); remove or replace them") from None
    if len(ids) < 2:
        raise UserError(f"{file} has {len(ids)} token(s); evaluation needs at least 2 (one to predict)")
    return np.array(ids, dtype=np.int64)


def find_prepared(data_dir: str, data: dict, ckpt: Path) -> Path:
    """The prepared directory of the data `data` (a checkpoint's record): `data_dir` itself, or one or two
    levels below it (`data/shakespeare_char/char-...` from `data`); refused unless it is there and whole."""
    root = Path(data_dir).expanduser()
    made_from = (data["source"], data["tokenizer"], data["val_fraction"])  # what prepare_command needs
    if not root.is_dir():
        raise UserError(f"data_dir {root} is not a directory; pass data_dir= the data.data_dir of the training run")
    for directory in [root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))]:
        if directory.name.startswith(".") or not (directory / "meta.json").is_file():
            continue  # a preparation under way, or no prepared data
        try:
            if identity_of(json.loads((directory / "meta.json").read_text())) != data:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable or incomplete: not data we can match
        wrong = damage(directory, Source(data["source"], data["source_sha256"]), data["tokenizer"],
                       data["val_fraction"])
        if wrong is not None:
            raise UserError(f"prepared data in {directory} is damaged ({wrong}); rebuild it with "
                            f"{prepare_command(*made_from, directory.parent)}")
        return directory
    raise UserError(f"no prepared data under {root} is the data checkpoint {ckpt} was trained on "
                    f"({describe_data(data)}); pass data_dir= the directory it was prepared in, "
                    f"or prepare it with {prepare_command(*made_from)}")


def evaluate(ckpt: str = "latest", split: str | None = None, text: str | None = None, data_dir: str = "data",
             format: str = "text", device: str = "auto", batch_size: int = 16, out: TextIO = sys.stdout) -> dict:
    """Evaluate the checkpoint `ckpt` on a split of its own prepared data (`split`, val by default) or on the
    file `text`; print the result to `out` as lines or one JSON object (`format`) and return it."""
    torch_device = pick_device(device)
    model, tokenizer, checkpoint, path = load_model(ckpt, torch_device)
    data = checkpoint[CHECKPOINT_KEY].get("data")
    if text is not None:
        tokens, evaluated = text_tokens(text, tokenizer), f"text {text}"
    else:
        split = split or "val"
        if not data:
            what = "pretrained weights" if checkpoint[CHECKPOINT_KEY].get("pretrained") else "an older checkpoint"
            raise UserError(f"{title(path, checkpoint)} does not record the data it was trained on ({what}); "
                            "evaluate a text file with text=FILE")
        directory = find_prepared(data_dir, data, path)
        tokens = np.memmap(directory / f"{split}.bin", dtype=TOKEN_DTYPE, mode="r")
        evaluated = f"{split} split of {directory}"
    result = measure(model, tokenizer, tokens, batch_size)
    block = model.config.block_size
    report = {
        "checkpoint": str(path), "step": checkpoint.get("global_step"), "device": str(torch_device),
        "evaluated": evaluated, "windows": WINDOWS.format(n=block + 1, block=block), **asdict(result),
        "trained_on": describe_data(data) if data else None,
    }
    if format == "json":
        print(json.dumps(report), file=out)
    else:
        print("\n".join([
            f"evaluating {title(path, checkpoint)} on {torch_device}",
            describe_origin(checkpoint),
            f"evaluated: {evaluated}, {report['windows']}",
            (f"loss {result.loss:.4f} nats per token, perplexity {result.perplexity:.3f}, "
             f"bits per byte {result.bits_per_byte:.4f}"),
            f"{result.tokens:,} tokens predicted, {result.bytes:,} bytes, in {result.seconds:.2f}s",
        ]), file=out)
    return report
