"""GPTConfig, the GPT's shape and options: each field declares its rule once (torch-free).

A field's rule (`setting(default, rule)`) is what GPTConfig accepts when built in Python and what the training
config's `model.NAME` accepts before PyTorch loads (train/settings.py generates those rules from these fields):
a new option is one field here, its rule included, and a key in conf/model/gpt.yaml.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields
from typing import Any

from nanogpt_lightning.config import BOOLEAN, FRACTION, POSITIVE_INT, Rule, choice, integer, number, refusal

NORMS = ("layernorm", "rmsnorm")  # rmsnorm: a learned weight, no bias
MLPS = ("gelu", "gelu_tanh", "relu2")  # gelu_tanh: GELU's tanh approximation (OpenAI's GPT-2); relu2: ReLU squared


def setting(default: Any, rule: Rule) -> Any:
    """A field that is the setting `model.NAME`, accepting what `rule` does."""
    return field(default=default, metadata={"rule": rule})


def from_data(key: str) -> Any:
    """A field the run takes from the data (`key` names where), never from the model's settings."""
    return field(metadata={"rule": POSITIVE_INT, "key": key})


@dataclass
class GPTConfig:
    block_size: int = from_data("data.block_size")
    vocab_size: int = from_data("vocab_size")  # the tokenizer's
    n_layer: int = setting(4, POSITIVE_INT)
    n_head: int = setting(4, POSITIVE_INT)
    n_embd: int = setting(128, POSITIVE_INT)
    dropout: float = setting(0.0, FRACTION)
    # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    bias: bool = setting(False, BOOLEAN)
    # pad the embedding table to a multiple of this (64 makes 50257 -> 50304)
    vocab_multiple: int = setting(1, POSITIVE_INT)
    # output layer + cross-entropy in chunks, never materialising all logits
    fused_loss: bool = setting(True, BOOLEAN)
    # modern options (modded-nanogpt's); the defaults are nanoGPT's model, so checkpoints that predate them
    # (their stored config lacks these keys) build the same model
    # rotary position embeddings on q and k instead of the learned position table wpe
    rotary: bool = setting(False, BOOLEAN)
    norm: str = setting("layernorm", choice(*NORMS))  # ln_1, ln_2, ln_f
    # RMS-normalise q and k per head (no weight) before attention (and before rotary)
    qk_norm: bool = setting(False, BOOLEAN)
    mlp: str = setting("gelu", choice(*MLPS))
    # False: the output layer lm_head is its own matrix, not the token embedding
    tie_embeddings: bool = setting(True, BOOLEAN)
    # a number c > 0: logits = c * tanh(logits / c)
    logit_softcap: float | None = setting(None, number("30", nullable=True))
    # zero-initialise the output projections (c_proj) and an untied lm_head
    zero_init: bool = setting(False, BOOLEAN)
    # each layer adds a token-indexed vector (its own table, zero at start) to v
    value_embeddings: bool = setting(False, BOOLEAN)
    # > 0: add a hashed embedding of each token with the two before it (zero at start)
    trigram_buckets: int = setting(0, integer(0, unit="buckets", example="8191"))

    def __post_init__(self):
        for f in fields(self):
            rule = f.metadata.get("rule")
            message = rule and refusal(setting_key(f), rule, getattr(self, f.name))
            if message:
                raise ValueError(message)
        message = shape_refusal(self.n_embd, self.n_head, self.rotary)
        if message:
            raise ValueError(message)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


def setting_key(f: Field) -> str:
    """The setting a GPTConfig field is: `model.NAME`, or where the run takes it from (data.block_size)."""
    return f.metadata.get("key", f"model.{f.name}")


def model_rules(config_class: type = GPTConfig) -> dict[str, Rule]:
    """The rules of the `model.*` settings, one per field of `config_class` that is a model setting."""
    return {key: f.metadata["rule"] for f in fields(config_class)
            if "rule" in f.metadata and (key := setting_key(f)).startswith("model.")}


def shape_refusal(n_embd: int, n_head: int, rotary: bool) -> str | None:
    """The constraints across the shape's settings, one line each, or None: n_embd a multiple of n_head;
    under rotary an even head size. The one check of both the training config (train/settings.py) and a
    GPTConfig built in Python."""
    if n_embd % n_head:
        return (f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head}); "
                f"pass e.g. model.n_embd={math.ceil(n_embd / n_head) * n_head}")
    head_size = n_embd // n_head
    if rotary and head_size % 2:
        return (f"model.rotary needs an even head size, got n_embd / n_head = {head_size}; "
                f"pass e.g. model.n_embd={(head_size + 1) * n_head}, or model.rotary=false")
    return None
