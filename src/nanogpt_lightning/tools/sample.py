"""Generate text from a prompt and stream it (the body of scripts/sample.py).

The checkpoint carries the model config and the tokenizer, so no dataset is needed; `ckpt=gpt2` (any
`model.init_from` value) samples from pretrained weights with GPT-2's tokenizer (train/checkpoints.load_model).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch
from torch.nn import functional as F

from nanogpt_lightning.data.tokenizer import Tokenizer, UnknownCharactersError
from nanogpt_lightning.devices import (
    MIXED_PRECISION_DTYPES,
    PRECISION_ALIASES,
    auto_precision,
    autocast_for,
    check_precision,
    pick_device,
)
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.files import read_user_text
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.train.checkpoints import CHECKPOINT_KEY, describe_origin, load_model, title

SEPARATOR = "---------------"  # printed after each sample, as nanoGPT does


def sampling_precision(precision: str, checkpoint: dict, device: torch.device) -> str:
    """`run`: the mixed precision the checkpoint's run trained in, else float32 (pretrained weights, a run kept
    wholly in one dtype such as bf16-true: its weights load as float32), and where `device` lacks the run's
    float16 autocast (a GPU run sampled on cpu) what `auto` picks; `auto`: what trainer.precision=auto picks
    on `device`; else the one named. Refused in one line where the device lacks it."""
    if precision == "run":
        trained = str(checkpoint[CHECKPOINT_KEY].get("settings", {}).get("trainer.precision", "32-true"))
        trained = PRECISION_ALIASES.get(trained, trained)
        precision = trained if trained in MIXED_PRECISION_DTYPES else "32-true"
        if precision == "16-mixed" and device.type == "cpu":
            precision = auto_precision(device)
    elif precision == "auto":
        precision = auto_precision(device)
    check_precision(precision, device)
    return precision


def read_prompt(prompt: str) -> str:
    """The prompt text; `FILE:path` reads it from a file."""
    if prompt.startswith("FILE:"):
        prompt = read_user_text(Path(prompt[len("FILE:"):]).expanduser(), "the prompt file",
                                "pass prompt=FILE:path.txt, a UTF-8 text file")
    if not prompt:
        raise UserError("the prompt is empty; pass at least one character, e.g. prompt='\\n'")
    return prompt


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    try:
        return tokenizer.encode(prompt)
    except UnknownCharactersError as err:
        raise UserError(f"this character-level model cannot encode the prompt ({err}); "
                        "remove or replace them") from None


class TopK:
    """The k-th largest logit of each row, for top-k filtering.

    Some devices refuse `torch.topk` (mps in older PyTorch builds for k > 16); after the first refusal
    this small step runs on the CPU for the rest of the generation.
    """

    def __init__(self):
        self.on_cpu = False

    def kth_largest(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        if not self.on_cpu:
            try:
                return torch.topk(logits, k).values[:, [-1]]
            except RuntimeError:
                self.on_cpu = True
        return torch.topk(logits.cpu(), k).values[:, [-1]].to(logits.device)


@torch.no_grad()
def generate(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; `temperature=0` is greedy.

    The context is cropped to the last block_size tokens, as in nanoGPT. While the whole sequence fits
    in the block, a key/value cache feeds only the newest token; past the block every position shifts,
    so the cropped context is recomputed in full (what nanoGPT does at every step).
    """
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
    caches = None
    top = TopK()
    for _ in range(max_new_tokens):
        if ids.size(1) > block_size:
            hidden = model.hidden_states(ids[:, -block_size:])
        elif caches is None:
            caches = [{} for _ in model.transformer.h]
            hidden = model.hidden_states(ids, caches)
        else:
            hidden = model.hidden_states(ids[:, -1:], caches)
        logits = model.logits(hidden[:, -1, :])[:, :vocab_size]  # drop the padding of the vocabulary
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < vocab_size:
                logits = logits.masked_fill(logits < top.kth_largest(logits, top_k), float("-inf"))
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        ids = torch.cat((ids, next_id), dim=1)
        yield next_id.item()


def stream_text(tokenizer: Tokenizer, token_ids: Iterator[int]) -> Iterator[str]:
    """Decode ids as they come. A BPE token can end inside a multi-byte character: such ids wait
    (shown as U+FFFD when decoded alone) until the character is complete."""
    pending: list[int] = []
    for token_id in token_ids:
        pending.append(token_id)
        text = tokenizer.decode(pending)
        if not text.endswith("\ufffd"):
            pending.clear()
            yield text
    if pending:
        yield tokenizer.decode(pending)


def sample(ckpt: str, prompt: str = "\n", num_samples: int = 10, max_new_tokens: int = 500,
           temperature: float = 0.8, top_k: int | None = 200, seed: int = 1337, device: str = "auto",
           precision: str = "run", out: TextIO = sys.stdout, info: TextIO = sys.stderr) -> list[str]:
    """Print `num_samples` samples to `out`, each the prompt and its continuation, then a separator line.

    Notes (checkpoint, the data it was trained on, speed) go to `info`. Returns the samples' texts.
    """
    text = read_prompt(prompt)
    torch_device = pick_device(device)
    model, tokenizer, checkpoint, path = load_model(ckpt, torch_device)
    prompt_ids = encode_prompt(tokenizer, text)
    precision = sampling_precision(precision, checkpoint, torch_device)
    print(f"sampling from {title(path, checkpoint)} on {torch_device} in {precision}", file=info)
    print(describe_origin(checkpoint), file=info)

    torch.manual_seed(seed)
    samples = []
    start = time.perf_counter()
    for _ in range(num_samples):
        out.write(text)
        pieces = [text]
        with autocast_for(precision, torch_device):
            for piece in stream_text(tokenizer, generate(model, prompt_ids, max_new_tokens, temperature, top_k)):
                out.write(piece)
                out.flush()
                pieces.append(piece)
        out.write(f"\n{SEPARATOR}\n")
        samples.append("".join(pieces))
    seconds = time.perf_counter() - start
    n_tokens = num_samples * max_new_tokens
    print(f"{n_tokens} tokens in {seconds:.2f}s: {n_tokens / seconds:.1f} tokens/s", file=info)
    return samples
