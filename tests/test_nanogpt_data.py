"""A folder nanoGPT's prepare.py wrote trains as it is: its bins, and meta.pkl's character vocabulary read
without running anything a pickle could hold."""

import os
import pickle

import numpy as np
import pytest

from helpers import SONNETS
from nanogpt_lightning.data.datamodule import TextDataModule
from nanogpt_lightning.data.prepare import describe_data
from nanogpt_lightning.data.shards import split_tokens
from nanogpt_lightning.data.tokenizer import GPT2Tokenizer, tokenizer_from_meta
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.train.settings import compose_train_config


def nanogpt_prepare(folder, kind):
    """What nanoGPT's data/shakespeare_char/prepare.py (kind="char") or data/shakespeare/prepare.py ("gpt2")
    writes, from the sonnets."""
    folder.mkdir()
    data = SONNETS.read_text()
    n = len(data)
    train_data, val_data = data[:int(n * 0.9)], data[int(n * 0.9):]
    if kind == "char":
        chars = sorted(list(set(data)))
        stoi = {ch: i for i, ch in enumerate(chars)}
        itos = {i: ch for i, ch in enumerate(chars)}
        encode = lambda s: [stoi[c] for c in s]  # noqa: E731 (nanoGPT's own line)
        with open(folder / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    else:
        encode = GPT2Tokenizer().encode
    np.array(encode(train_data), dtype=np.uint16).tofile(folder / "train.bin")
    np.array(encode(val_data), dtype=np.uint16).tofile(folder / "val.bin")
    return folder


def nanogpt_data(tmp_path, folder):
    return TextDataModule(data_dir=str(tmp_path / "data"), nanogpt_dir=str(folder), url=None, block_size=16,
                          batch_size=4, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_a_nanogpt_folder_trains_as_it_is(kind, tmp_path):
    folder = nanogpt_prepare(tmp_path / "shakespeare", kind)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    data = nanogpt_data(tmp_path, folder)
    data.prepare_data()
    assert data.prepared_dir == folder
    assert data.vocab_size == (50257 if kind == "gpt2" else len(set(SONNETS.read_text())))
    tokenizer = tokenizer_from_meta(data.meta["tokenizer"])
    assert tokenizer.decode(split_tokens(folder, data.meta, "train").tolist()) == SONNETS.read_text()[:2748]
    # the same tokens as this project's own preparation of the same text
    ours = TextDataModule(data_dir=str(tmp_path / "ours"), input_file=str(SONNETS), tokenizer=kind, url=None)
    ours.prepare_data()
    assert (ours.prepared_dir / "train.bin").read_bytes() == before["train.bin"]
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 16)
    assert describe_data(data.identity).startswith(f"shakespeare (sha256 {data.identity['source_sha256'][:12]}")
    assert describe_data(data.identity).endswith(f"{kind} tokenizer, its own val split")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written into it
    assert not (tmp_path / "data").exists()


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_meta_pkl_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = nanogpt_prepare(tmp_path / "shakespeare", "char")
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "hook": Boom()}))
    with pytest.raises(UserError, match=r"meta.pkl as nanoGPT's meta.pkl \(it holds posix.system, not plain data\)"):
        nanogpt_data(tmp_path, folder).prepare_data()
    assert not (tmp_path / "pwned").exists()


def test_the_nanogpt_preset_composes():
    assert compose_train_config(["data=nanogpt", "data.nanogpt_dir=x"]).data.nanogpt_dir == "x"
