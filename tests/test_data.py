import json

import numpy as np
import pytest
import torch

from nanogpt_lightning import data as data_module
from nanogpt_lightning.data import RandomWindows, TextDataModule, prepare_dataset
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.tokenizer import tokenizer_from_meta

from conftest import SONNETS, TINY_SHAKESPEARE


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_prepare_writes_bins_that_decode_back_to_the_text(kind, tmp_path, sonnets_text, capsys):
    meta = prepare_dataset(SONNETS, tmp_path, kind)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    tok = tokenizer_from_meta(meta["tokenizer"])
    assert meta["vocab_size"] == tok.vocab_size == (50257 if kind == "gpt2" else len(set(sonnets_text)))
    split = int(len(sonnets_text) * 0.9)
    assert tok.decode(train.tolist()) == sonnets_text[:split]
    assert tok.decode(val.tolist()) == sonnets_text[split:]
    out = capsys.readouterr().out
    assert f"train has {len(train):,} tokens" in out and f"val has {len(val):,} tokens" in out


@pytest.mark.skipif(not TINY_SHAKESPEARE.exists(), reason="needs ../shared/data/tinyshakespeare/input.txt")
@pytest.mark.parametrize("kind, train_count, val_count", [
    ("gpt2", "301,966", "36,059"), ("char", "1,003,854", "111,540")])
def test_prepare_tiny_shakespeare_gives_nanogpts_counts(kind, train_count, val_count, tmp_path, capsys):
    prepare_dataset(TINY_SHAKESPEARE, tmp_path, kind)
    assert capsys.readouterr().out.splitlines() == [f"train has {train_count} tokens",
                                                    f"val has {val_count} tokens"]


def make_datamodule(tmp_path, **kwargs):
    options = dict(data_dir=str(tmp_path / "bins"), input_file=str(SONNETS), url=None, block_size=16,
                   batch_size=4, eval_iters=3)
    return TextDataModule(**{**options, **kwargs})


def test_batches_are_shifted_windows_of_the_training_tokens(tmp_path):
    dm = make_datamodule(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    tokens = np.fromfile(tmp_path / "bins" / "train.bin", dtype=np.uint16).astype(np.int64)
    batches = iter(dm.train_dataloader())
    for _ in range(5):
        x, y = next(batches)
        assert x.shape == y.shape == (4, 16)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert 0 <= int(x.min()) and int(y.max()) < dm.vocab_size
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            # every row is a real window of the training split
            starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 16) == row_x, axis=1))
            assert any(np.array_equal(tokens[s + 1:s + 17], row_y) for s in starts)


def test_the_stream_depends_only_on_its_key_and_start(tmp_path):
    prepare_dataset(SONNETS, tmp_path, "char")
    bin_path = tmp_path / "train.bin"
    whole = list(RandomWindows(bin_path, 8, 2, key=(1, 0, 0), num_batches=6))
    resumed = list(RandomWindows(bin_path, 8, 2, key=(1, 0, 0), start=4, num_batches=2))
    for (x1, y1), (x2, y2) in zip(whole[4:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_rank = next(iter(RandomWindows(bin_path, 8, 2, key=(1, 0, 1))))
    assert not torch.equal(other_rank[0], whole[0][0])


def test_each_evaluation_sees_fresh_batches_of_both_splits(tmp_path):
    dm = make_datamodule(tmp_path)
    dm.prepare_data()
    train_loader, val_loader = dm.val_dataloader()
    first, second = list(train_loader), list(train_loader)
    assert len(first) == len(second) == 3
    assert not torch.equal(first[0][0], second[0][0])
    val_tokens = set(np.fromfile(tmp_path / "bins" / "val.bin", dtype=np.uint16).tolist())
    assert set(torch.cat([x for x, _ in val_loader]).flatten().tolist()) <= val_tokens


def test_prepared_bins_are_reused_without_download(tmp_path, monkeypatch):
    dm = make_datamodule(tmp_path)
    dm.prepare_data()
    stamp = (tmp_path / "bins" / "train.bin").stat().st_mtime_ns

    def no_network(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(data_module.urllib.request, "urlopen", no_network)
    make_datamodule(tmp_path).prepare_data()
    make_datamodule(tmp_path, input_file=None, url="https://example.invalid/input.txt").prepare_data()
    assert (tmp_path / "bins" / "train.bin").stat().st_mtime_ns == stamp


def test_a_different_input_file_is_prepared_again(tmp_path):
    make_datamodule(tmp_path).prepare_data()
    other = tmp_path / "other.txt"
    other.write_text("to be or not to be, that is the question " * 20)
    dm = make_datamodule(tmp_path, input_file=str(other))
    dm.prepare_data()
    assert dm.meta["source"] == str(other.resolve())
    assert tokenizer_from_meta(dm.meta["tokenizer"]).chars == "".join(sorted(set(other.read_text())))


def test_offline_without_a_local_file_says_how_to_pass_one(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise data_module.urllib.error.URLError("no network")

    monkeypatch.setattr(data_module.urllib.request, "urlopen", offline)
    dm = make_datamodule(tmp_path, input_file=None, url="https://example.invalid/input.txt",
                         cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"data.input_file=PATH"):
        dm.prepare_data()
    assert not (tmp_path / "bins").exists()


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("", "is empty")])
def test_missing_or_empty_input_file(tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        make_datamodule(tmp_path, input_file=str(path)).prepare_data()


def test_text_shorter_than_one_block(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a short text, not long enough for the context asked for")
    dm = make_datamodule(tmp_path, input_file=str(short), block_size=32)
    with pytest.raises(UserError, match="data.block_size=32"):
        dm.prepare_data()  # refused before any bin is written
    assert not (tmp_path / "bins").exists()
