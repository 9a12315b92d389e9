import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import SONNETS, TINY_SHAKESPEARE, prepare_text
from nanogpt_lightning.data import prepare as data_module
from nanogpt_lightning.data.datamodule import TextDataModule
from nanogpt_lightning.data.prepare import describe_data
from nanogpt_lightning.data.shards import ShardWriter
from nanogpt_lightning.data.tokenizer import tokenizer_from_meta
from nanogpt_lightning.data.windows import RandomWindows
from nanogpt_lightning.errors import UserError

URL = "https://example.invalid/input.txt"


def bins(directory):
    return {split: np.fromfile(directory / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")}


def files(directory):
    """Every file under `directory` (hidden ones too) and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def make_datamodule(tmp_path, **kwargs):
    options = dict(data_dir=str(tmp_path / "bins"), input_file=str(SONNETS), url=None, block_size=16,
                   batch_size=4, eval_iters=3)
    return TextDataModule(**{**options, **kwargs})


def first_batches(loader, n=3):
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


@pytest.fixture
def serve_url(monkeypatch):
    """urlopen answers with the given bytes, counting the downloads."""
    served = SimpleNamespace(body=SONNETS.read_bytes(), downloads=0)

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return served.body

    def urlopen(url, timeout):
        served.downloads += 1
        return Response()

    monkeypatch.setattr(data_module.urllib.request, "urlopen", urlopen)
    return served


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_prepare_writes_bins_that_decode_back_to_the_text(kind, tmp_path, sonnets_text, capsys):
    directory = prepare_text(SONNETS, tmp_path, kind)
    assert directory.parent == tmp_path and directory.name.startswith(f"{kind}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory.name]  # no temporary left
    train, val = bins(directory).values()
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["source"] == str(SONNETS.resolve())
    assert meta["source_bytes"] == SONNETS.stat().st_size
    assert meta["source_sha256"] == data_module.sha256_of(SONNETS.read_bytes())
    assert meta["val_fraction"] == 0.1
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    tok = tokenizer_from_meta(meta["tokenizer"])
    assert meta["vocab_size"] == tok.vocab_size == (50257 if kind == "gpt2" else len(set(sonnets_text)))
    split = int(len(sonnets_text) * 0.9)
    assert tok.decode(train.tolist()) == sonnets_text[:split]
    assert tok.decode(val.tolist()) == sonnets_text[split:]
    assert capsys.readouterr().out.splitlines() == [f"train has {len(train):,} tokens", f"val has {len(val):,} tokens",
                                                    f"prepared data: {directory}"]


@pytest.mark.shared_text
@pytest.mark.skipif(not TINY_SHAKESPEARE.exists(), reason="needs ../shared/data/tinyshakespeare/input.txt")
@pytest.mark.parametrize("kind, train_count, val_count", [
    ("gpt2", "301,966", "36,059"), ("char", "1,003,854", "111,540")])
def test_prepare_tiny_shakespeare_gives_nanogpts_counts(kind, train_count, val_count, tmp_path, capsys):
    directory = prepare_text(TINY_SHAKESPEARE, tmp_path, kind)
    assert capsys.readouterr().out.splitlines() == [f"train has {train_count} tokens",
                                                    f"val has {val_count} tokens", f"prepared data: {directory}"]


def test_batches_are_shifted_windows_of_the_training_tokens(tmp_path):
    dm = make_datamodule(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    tokens = bins(dm.prepared_dir)["train"].astype(np.int64)
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
    bin_path = prepare_text(SONNETS, tmp_path, "char") / "train.bin"
    whole = list(RandomWindows(bin_path, 8, 2, key=(1, 0, 0), num_batches=6))
    resumed = list(RandomWindows(bin_path, 8, 2, key=(1, 0, 0), start=4, num_batches=2))
    assert same(whole[4:], resumed)
    other_rank = next(iter(RandomWindows(bin_path, 8, 2, key=(1, 0, 1))))
    assert not torch.equal(other_rank[0], whole[0][0])


def test_evaluation_batches_depend_on_the_step_split_and_rank_only(tmp_path):
    dm = make_datamodule(tmp_path)
    dm.prepare_data()

    def evaluation(step, rank=0):
        dm.trainer = SimpleNamespace(global_rank=rank, global_step=step)
        return [list(loader) for loader in dm.val_dataloader()]

    at_30 = evaluation(30)
    assert [len(batches) for batches in at_30] == [3, 3]
    assert all(loader.num_workers == 0 for loader in dm.val_dataloader())
    # the same loaders evaluate again at step 30 after other evaluations, as a resumed run's fresh ones do
    loaders = dm.val_dataloader()
    dm.trainer.global_step = 20
    at_20 = [list(loader) for loader in loaders]
    dm.trainer.global_step = 30
    assert all(same(a, b) for a, b in zip(at_30, [list(loader) for loader in loaders]))
    assert all(same(a, b) for a, b in zip(at_30, evaluation(30)))
    assert not any(torch.equal(a[0][0], b[0][0]) for a, b in zip(at_30, at_20))
    assert not any(torch.equal(a[0][0], b[0][0]) for a, b in zip(at_30, evaluation(30, rank=1)))
    # each loader is its split
    train_at_30, val_at_30 = at_30
    assert not torch.equal(train_at_30[0][0], val_at_30[0][0])
    val_tokens = set(bins(dm.prepared_dir)["val"].tolist())
    assert set(torch.cat([x for x, _ in val_at_30]).flatten().tolist()) <= val_tokens


def test_worker_processes_give_the_training_batches_of_one_process(tmp_path):
    dm = make_datamodule(tmp_path)
    dm.prepare_data()
    dm.trainer = SimpleNamespace(global_rank=0, global_step=3, accumulate_grad_batches=2)
    alone = first_batches(dm.train_dataloader(), 6)
    workers = make_datamodule(tmp_path, num_workers=2)
    workers.trainer = dm.trainer
    loader = workers.train_dataloader()
    assert loader.num_workers == 2
    assert same(alone, first_batches(loader, 6))


def test_a_prepared_source_is_reused_without_download_or_cache(tmp_path, serve_url):
    file_dm = make_datamodule(tmp_path)
    file_dm.prepare_data()
    cache = tmp_path / "cache"
    url_dm = make_datamodule(tmp_path, input_file=None, url=URL, cache_dir=str(cache))
    url_dm.prepare_data()
    assert serve_url.downloads == 1
    assert url_dm.prepared_dir != file_dm.prepared_dir  # known by its URL, not by its bytes
    assert url_dm.meta["source"] == URL and url_dm.meta["source_sha256"] == file_dm.meta["source_sha256"]
    before = files(tmp_path / "bins")
    (cache / "input.txt").unlink()
    again = make_datamodule(tmp_path, input_file=None, url=URL, cache_dir=str(cache))
    again.prepare_data()
    make_datamodule(tmp_path).prepare_data()
    assert serve_url.downloads == 1 and not (cache / "input.txt").exists()
    assert files(tmp_path / "bins") == before
    assert again.prepared_dir == url_dm.prepared_dir


def test_a_different_input_file_never_uses_the_default_texts_data(tmp_path, serve_url):
    """shakespeare_char with data.input_file=small.txt, then plain shakespeare_char again."""
    default = dict(input_file=None, url=URL, cache_dir=str(tmp_path / "cache"))
    make_datamodule(tmp_path, **default).prepare_data()
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be, that is the question " * 20)
    small_dm = make_datamodule(tmp_path, input_file=str(small))
    small_dm.prepare_data()
    assert small_dm.meta["source"] == str(small.resolve())
    assert tokenizer_from_meta(small_dm.meta["tokenizer"]).chars == "".join(sorted(set(small.read_text())))
    plain = make_datamodule(tmp_path, **default)
    plain.prepare_data()
    assert plain.meta["source"] == URL and plain.meta["source_bytes"] == SONNETS.stat().st_size
    assert plain.prepared_dir != small_dm.prepared_dir
    assert serve_url.downloads == 1


def test_two_texts_and_tokenizers_coexist(tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(SONNETS.read_text()[::-1])
    modules = [make_datamodule(tmp_path, input_file=str(path), tokenizer=kind)
               for path in (SONNETS, other) for kind in ("char", "gpt2")]
    for dm in modules:
        dm.prepare_data()
    assert len({dm.prepared_dir for dm in modules}) == 4
    assert sorted(p.name for p in (tmp_path / "bins").iterdir()) == sorted(dm.prepared_dir.name for dm in modules)
    for dm in modules:
        tok = tokenizer_from_meta(dm.meta["tokenizer"])
        assert tok.decode(bins(dm.prepared_dir)["train"].tolist()) in dm.input_file.read_text()


def test_preparing_other_data_meanwhile_leaves_a_running_jobs_data_alone(tmp_path):
    dm = make_datamodule(tmp_path)
    dm.prepare_data()
    dm.trainer = SimpleNamespace(global_rank=0, global_step=0, accumulate_grad_batches=1)
    expected_train = first_batches(dm.train_dataloader(), 4)
    train_stream = iter(dm.train_dataloader())
    loaders = dm.val_dataloader()
    assert same(expected_train[:2], [next(train_stream) for _ in range(2)])
    first_eval = [list(loader) for loader in loaders]
    meta = dm.meta
    other = tmp_path / "other.txt"
    other.write_text(SONNETS.read_text().upper())
    for kind in ("char", "gpt2"):
        make_datamodule(tmp_path, input_file=str(other), tokenizer=kind).prepare_data()
    make_datamodule(tmp_path).prepare_data(force=True)  # its own data rebuilt by scripts/prepare.py
    assert dm.meta == meta
    assert same(expected_train[2:], [next(train_stream) for _ in range(2)])
    assert all(same(a, b) for a, b in zip(first_eval, [list(loader) for loader in loaders]))


@pytest.mark.parametrize("force", [False, True])
def test_two_preparations_of_the_same_data_at_once_both_end_with_it_whole(tmp_path, monkeypatch, force):
    """The second preparation starts and finishes while the first is writing its shards."""
    close = ShardWriter.close_shard
    second = make_datamodule(tmp_path)
    started = []

    def close_while_another_prepares(writer):
        if writer._split == "val" and not started:
            started.append(True)
            second.prepare_data(force=force)
            assert second.prepared_dir.exists()
        close(writer)

    monkeypatch.setattr(ShardWriter, "close_shard", close_while_another_prepares)
    first = make_datamodule(tmp_path)
    first.prepare_data(force=force)
    assert first.prepared_dir == second.prepared_dir
    assert sorted(p.name for p in (tmp_path / "bins").iterdir()) == [first.prepared_dir.name]
    first.setup("fit")
    second.setup("fit")
    assert first.meta == second.meta and first.meta["tokens"] == {"train": 2748, "val": 306}


def stop_at_the_val_shard(monkeypatch, interrupt):
    """Make the next preparation stop (`interrupt`) as it closes its val shard, the train shard whole."""
    close = ShardWriter.close_shard

    def close_then_stop(writer):
        if writer._split == "val":
            raise interrupt("stopped while writing")
        close(writer)

    monkeypatch.setattr(ShardWriter, "close_shard", close_then_stop)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_an_interrupted_first_preparation_leaves_nothing_in_place(tmp_path, monkeypatch, interrupt, capsys):
    """Only the hidden work directory and the whole train shard in it, which the same command goes on from."""
    stop_at_the_val_shard(monkeypatch, interrupt)
    dm = make_datamodule(tmp_path)
    with pytest.raises(KeyboardInterrupt if interrupt is KeyboardInterrupt else UserError):
        dm.prepare_data()
    work = tmp_path / "bins" / f".{dm.prepared_dir.name}.partial"
    assert list((tmp_path / "bins").iterdir()) == [work]
    assert sorted(p.name for p in work.iterdir()) == ["progress.json", "train-00000.bin"]
    assert capsys.readouterr().err.splitlines() == [
        f"stopped: 2,748 tokens in whole shards kept in {work}; the same command goes on from there"]
    monkeypatch.undo()
    dm.prepare_data()
    assert capsys.readouterr().out.splitlines()[0] == (
        f"resuming an interrupted preparation: 1 whole shard(s), 2,748 tokens kept in {work}")
    assert sorted(p.name for p in (tmp_path / "bins").iterdir()) == [dm.prepared_dir.name]
    uninterrupted = make_datamodule(tmp_path, data_dir=str(tmp_path / "again"))
    uninterrupted.prepare_data()
    assert files(dm.prepared_dir) == files(uninterrupted.prepared_dir)


def test_an_interrupted_rebuild_leaves_the_old_data_whole(tmp_path, monkeypatch):
    dm = make_datamodule(tmp_path)
    dm.prepare_data()
    before = files(tmp_path / "bins")
    stop_at_the_val_shard(monkeypatch, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        make_datamodule(tmp_path).prepare_data(force=True)
    # the old data as it was; beside it, hidden, the whole train shard of the rebuild
    assert {name: data for name, data in files(tmp_path / "bins").items() if not name.startswith(".")} == before


def test_a_rebuild_interrupted_between_its_renames_puts_the_old_data_back(tmp_path, monkeypatch):
    dm = make_datamodule(tmp_path)
    dm.prepare_data()
    before = files(tmp_path / "bins")
    rename = data_module.os.rename
    calls = []

    def rename_then_stop(src, dst):
        calls.append((src, dst))
        if len(calls) == 3:  # tmp -> place (refused: it is there), place -> aside, now tmp -> place
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(data_module.os, "rename", rename_then_stop)
    with pytest.raises(KeyboardInterrupt):
        make_datamodule(tmp_path).prepare_data(force=True)
    monkeypatch.undo()
    assert calls[1][0] == dm.prepared_dir  # the old data was moved aside
    assert files(tmp_path / "bins") == before


def damage_meta_text(directory):
    (directory / "meta.json").write_text('{"tokenizer": ')


def damage_meta_key(directory):
    meta = json.loads((directory / "meta.json").read_text())
    del meta["tokens"]
    (directory / "meta.json").write_text(json.dumps(meta))


def damage_bin(directory):
    with open(directory / "train.bin", "r+b") as f:
        f.truncate(100)


def damage_missing_bin(directory):
    (directory / "val.bin").unlink()


DAMAGES = {
    "meta.json not JSON": (damage_meta_text, "meta.json is not JSON"),
    "meta.json without tokens": (damage_meta_key, "meta.json lacks tokens"),
    "truncated train.bin": (damage_bin, "train.bin has 100 bytes, meta.json says 2,748 tokens"),
    "no val.bin": (damage_missing_bin, "val.bin missing"),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_damaged_data_is_refused_in_one_line_or_rebuilt(tmp_path, name, capsys):
    damage, what = DAMAGES[name]
    prepared = make_datamodule(tmp_path)
    prepared.prepare_data()
    whole = files(prepared.prepared_dir)
    damage(prepared.prepared_dir)
    damaged = files(prepared.prepared_dir)
    capsys.readouterr()

    reader = make_datamodule(tmp_path)  # a module that reads without preparing
    with pytest.raises(UserError) as refused:
        reader.setup("fit")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"prepared data in {prepared.prepared_dir} is damaged ({what});")
    assert message.endswith(f"; rebuild it with python scripts/prepare.py data.input_file={SONNETS} "
                            f"data.tokenizer=char data.val_fraction=0.1 data.data_dir={tmp_path / 'bins'}")
    assert files(prepared.prepared_dir) == damaged  # refusing touches nothing

    rebuilt = make_datamodule(tmp_path)
    rebuilt.prepare_data()
    assert capsys.readouterr().out.splitlines()[0] == (
        f"prepared data in {prepared.prepared_dir} is damaged ({what}); rebuilding it")
    assert files(rebuilt.prepared_dir) == whole
    assert sorted(p.name for p in (tmp_path / "bins").iterdir()) == [prepared.prepared_dir.name]
    rebuilt.setup("fit")
    assert next(iter(rebuilt.train_dataloader()))[0].shape == (4, 16)


def test_missing_data_says_how_to_prepare_it(tmp_path):
    with pytest.raises(UserError, match=r"no prepared data for these data.\* settings in .*bins; prepare it with "
                                        r"python scripts/prepare.py data.input_file=null data.url=\S+ "):
        _ = make_datamodule(tmp_path, input_file=None, url=URL).meta


def test_identity_and_its_description(tmp_path):
    dm = make_datamodule(tmp_path, tokenizer="gpt2", val_fraction=0.125)
    dm.prepare_data()
    identity = dm.identity
    assert json.loads(json.dumps(identity)) == identity
    assert identity == {"source": str(SONNETS.resolve()), "source_sha256": dm.meta["source_sha256"],
                        "source_bytes": 3054, "tokenizer": "gpt2", "val_fraction": 0.125, "tokens": dm.meta["tokens"]}
    assert describe_data(identity) == (
        f"sonnets.txt (sha256 {identity['source_sha256'][:12]}..., 3,054 bytes), gpt2 tokenizer, 12.5% val")
    assert describe_data({**identity, "source": URL, "val_fraction": 0.1}).startswith("input.txt (sha256 ")
    assert describe_data({**identity, "val_fraction": 0.1}).endswith(", 10% val")


def test_offline_without_a_local_file_says_how_to_pass_one(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise data_module.urllib.error.URLError("no network")

    monkeypatch.setattr(data_module.urllib.request, "urlopen", offline)
    dm = make_datamodule(tmp_path, input_file=None, url=URL, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"data.input_file=PATH"):
        dm.prepare_data()
    assert not (tmp_path / "bins").exists()


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"", "is empty"),
                                              (b"caf\xe9 in Latin-1", "is not UTF-8 text")])
def test_missing_empty_or_binary_input_file(tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        make_datamodule(tmp_path, input_file=str(path)).prepare_data()
    assert not (tmp_path / "bins").exists()


def test_text_shorter_than_one_block(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a short text, not long enough for the context asked for")
    dm = make_datamodule(tmp_path, input_file=str(short), block_size=32)
    with pytest.raises(UserError, match="data.block_size=32"):
        dm.prepare_data()  # refused before any bin is written
    assert not (tmp_path / "bins").exists()


def test_a_url_with_its_sha256_finds_the_data_of_a_local_copy_and_checks_a_download(tmp_path, serve_url):
    """data=shakespeare_char names tiny-shakespeare's SHA-256: data prepared from a local copy serves it offline."""
    sha256 = data_module.sha256_of(SONNETS.read_bytes())
    local = make_datamodule(tmp_path)
    local.prepare_data()
    by_url = make_datamodule(tmp_path, input_file=None, url=URL, sha256=sha256, cache_dir=str(tmp_path / "cache"))
    by_url.prepare_data()
    assert by_url.prepared_dir == local.prepared_dir and serve_url.downloads == 0
    serve_url.body = b"something else entirely " * 200
    wrong = make_datamodule(tmp_path, input_file=None, url=URL, sha256=sha256, cache_dir=str(tmp_path / "cache"),
                            data_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match=rf"has SHA-256 \w+, not the expected {sha256} \(data.sha256\); pass a good "
                                        "local copy with data.input_file=PATH"):
        wrong.prepare_data()
    assert not (tmp_path / "cache" / "input.txt").exists()


def test_progress_is_whole_lines_when_stdout_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_module, "PROGRESS_EVERY_S", 0.0)
    make_datamodule(tmp_path, tokenizer="gpt2", shard_tokens=100).prepare_data()
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"preparing: \d+ MB of 0 MB \(\d+%\), \d\d:\d\d:\d\d left, 0 documents, [\d,]+ tokens, "
                        r"[\d.]+ MB/s", lines[0]), lines[0]
    assert lines[-3:-1] == ["train has 727 tokens", "val has 81 tokens"]
