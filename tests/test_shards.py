"""Prepared data in shards: several per split, any token type, resumed after an interruption to the bytes of an
uninterrupted preparation; windows drawn across shards; data prepared before shards still read."""

import json
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from helpers import ROOT, SONNETS
from nanogpt_lightning.data.datamodule import TextDataModule
from nanogpt_lightning.data.shards import ShardWriter, split_tokens
from nanogpt_lightning.data.tokenizer import tokenizer_from_meta
from nanogpt_lightning.data.windows import RandomWindows
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.tools.sample import generate
from nanogpt_lightning.train.module import GPTModule
from nanogpt_lightning.train.optimizers import adamw
from nanogpt_lightning.train.schedules import WarmupCosineLR


def files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def folder_of_sonnets(root, copies=6):
    """`copies` files of the sonnets' words in random orders (about 700 GPT-2 tokens each)."""
    folder = root / "corpus"
    folder.mkdir()
    words = SONNETS.read_text().split()
    for i in range(copies):
        (folder / f"{i}.txt").write_text(" ".join(np.random.default_rng(i).choice(words, size=600)) + "\n")
    return folder


def datamodule(root, folder, **settings):
    options = dict(data_dir=str(root / "data"), input_file=str(folder), url=None, cache_dir=str(root / "cache"),
                   tokenizer="gpt2", block_size=8, batch_size=64, shard_tokens=1000, num_proc=2)
    return TextDataModule(**{**options, **settings})


def test_a_split_in_shards_holds_the_tokens_of_one_and_windows_come_from_every_shard(tmp_path):
    folder = folder_of_sonnets(tmp_path)
    sharded = datamodule(tmp_path, folder)
    sharded.prepare_data()
    whole = datamodule(tmp_path, folder, data_dir=str(tmp_path / "whole"), shard_tokens=10**9)
    whole.prepare_data()
    shards = sharded.meta["shards"]["train"]
    assert len(shards) >= 3 and all(tokens >= 1000 for _, tokens in shards[:-1])
    assert [name for name, _ in shards] == [f"train-{i:05d}.bin" for i in range(len(shards))]
    assert whole.meta["shards"]["train"] == [["train.bin", whole.meta["tokens"]["train"]]]
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_tokens(sharded.prepared_dir, sharded.meta, split),
                                      split_tokens(whole.prepared_dir, whole.meta, split))
    # every window is one of a shard's, and every shard is drawn from about in proportion to its windows
    sharded.trainer = SimpleNamespace(global_rank=0, global_step=0, accumulate_grad_batches=1)
    batches = iter(sharded.train_dataloader())
    arrays = [np.fromfile(sharded.prepared_dir / name, dtype=np.uint16) for name, _ in shards]
    rows = np.concatenate([next(batches)[0].numpy() for _ in range(20)])
    found = [next(i for i, a in enumerate(arrays)
                  if np.any(np.all(np.lib.stride_tricks.sliding_window_view(a, 8) == row, axis=1))) for row in rows]
    counts = np.bincount(found, minlength=len(arrays))
    expected = np.array([len(a) - 8 for a in arrays]) / sum(len(a) - 8 for a in arrays) * len(rows)
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected) + 5)


def test_one_shard_draws_the_windows_one_bin_always_did(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    x, _ = next(iter(RandomWindows(path, 8, 4, key=(1, 0, 0))))
    starts = np.random.default_rng([1, 0, 0, 0]).integers(0, 1000 - 8, size=4)  # the draw before shards
    np.testing.assert_array_equal(x.numpy(), tokens[starts[:, None] + np.arange(8)])


def test_an_interrupted_preparation_goes_on_from_its_whole_shards_to_the_same_bytes(tmp_path, monkeypatch, capsys):
    folder = folder_of_sonnets(tmp_path)
    close = ShardWriter.close_shard

    def stop_at_the_third(writer):
        if sum(map(len, writer.shards.values())) == 2:
            raise KeyboardInterrupt
        close(writer)

    monkeypatch.setattr(ShardWriter, "close_shard", stop_at_the_third)
    stopped = datamodule(tmp_path, folder)
    with pytest.raises(KeyboardInterrupt):
        stopped.prepare_data(force=True)
    monkeypatch.undo()
    work = tmp_path / "data" / f".{stopped.prepared_dir.name}.partial"
    kept = json.loads((work / "progress.json").read_text())["shards"]["train"]
    assert len(kept) == 2 and sorted(p.name for p in work.iterdir()) == [
        "progress.json", "train-00000.bin", "train-00001.bin"]
    assert capsys.readouterr().err.splitlines() == [
        f"stopped: {sum(n for _, n in kept):,} tokens in whole shards kept in {work}; the same command goes on from "
        "there"]
    resumed = datamodule(tmp_path, folder)
    resumed.prepare_data(force=True)
    assert capsys.readouterr().out.splitlines()[0].startswith(
        f"resuming an interrupted preparation: 2 whole shard(s), {sum(n for _, n in kept):,} tokens kept in {work}")
    uninterrupted = datamodule(tmp_path, folder, data_dir=str(tmp_path / "again"))
    uninterrupted.prepare_data()
    assert files(resumed.prepared_dir) == files(uninterrupted.prepared_dir)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [resumed.prepared_dir.name]


def test_data_prepared_before_shards_is_read_as_it_was(tmp_path):
    new = datamodule(tmp_path, SONNETS, tokenizer="char", batch_size=4)
    new.prepare_data()
    new.trainer = SimpleNamespace(global_rank=0, global_step=0, accumulate_grad_batches=1)
    meta = json.loads((new.prepared_dir / "meta.json").read_text())
    del meta["dtype"], meta["shards"]  # meta.json as data/prepare.py wrote it before shards
    (new.prepared_dir / "meta.json").write_text(json.dumps(meta))
    old = datamodule(tmp_path, SONNETS, tokenizer="char", batch_size=4)
    old.trainer = new.trainer
    assert old.identity == new.identity and old.vocab_size == new.vocab_size
    for a, b in zip(list(old.val_dataloader()[1]), list(new.val_dataloader()[1])):
        assert torch.equal(a[0], b[0])
    assert torch.equal(next(iter(old.train_dataloader()))[0], next(iter(new.train_dataloader()))[0])


def test_a_vocabulary_above_65536_characters_is_stored_in_uint32_trains_and_samples(tmp_path):
    rng = np.random.default_rng(0)
    alphabet = np.array([chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000])
    text = "".join(alphabet) + "".join(rng.choice(alphabet[:50], size=20_000))  # every character, then a few often
    path = tmp_path / "wide.txt"
    path.write_text(text)
    data = TextDataModule(data_dir=str(tmp_path / "data"), input_file=str(path), url=None, tokenizer="char",
                          block_size=8, batch_size=4, eval_iters=1, cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    assert data.meta["dtype"] == "uint32" and data.vocab_size == len(set(text)) > 65_536
    tokens = split_tokens(data.prepared_dir, data.meta, "train")
    assert tokens.dtype == np.uint32 and int(tokens.max()) >= 65_536
    tokenizer = tokenizer_from_meta(data.meta["tokenizer"])
    assert tokenizer.decode(tokens.tolist()) == text[:len(tokens)]
    module = GPTModule(GPTConfig(block_size=8, vocab_size=data.vocab_size, n_layer=1, n_head=1, n_embd=8),
                       data.meta["tokenizer"], optimizer=partial(adamw, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99)),
                       scheduler=partial(WarmupCosineLR, warmup_iters=1, lr_decay_iters=10, min_lr=1e-4))
    trainer = L.Trainer(logger=False, max_steps=2, accelerator="cpu", devices=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    sampled = list(generate(module.model.eval(), tokenizer.encode(text[:3]), max_new_tokens=5))
    assert len(sampled) == 5 and all(0 <= i < data.vocab_size for i in sampled)
    assert len(tokenizer.decode(sampled)) == 5


def test_prepare_script_starts_without_torch(tmp_path):
    """scripts/prepare.py needs neither PyTorch nor Lightning: it starts in a moment."""
    argv = ["prepare.py", "data=text", f"data.input_file={SONNETS}", f"data.data_dir={tmp_path / 'data'}"]
    code = (f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path({str(ROOT / 'scripts' / 'prepare.py')!r}, "
            "run_name='__main__')\nprint(sorted({'torch', 'lightning'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.stdout.splitlines()[-1] == "[]", result.stderr
