"""Corpora of many documents: a folder, a glob, JSON Lines, Parquet and a local `datasets` dataset give the
documents' tokens, each followed by one end-of-text token; their identity; their one-line refusals."""

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import SONNETS
from nanogpt_lightning.data import sources
from nanogpt_lightning.data.preparation import Preparation
from nanogpt_lightning.data.shards import split_tokens
from nanogpt_lightning.data.sources import cut, pieces_of
from nanogpt_lightning.data.tokenizer import EOT_TEXT, GPT2Tokenizer, tokenizer_from_meta
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.train.settings import compose_train_config

# the sonnets in documents of four lines (19 of them: 17 train, 2 val at the default val_fraction)
LINES = SONNETS.read_text().splitlines(keepends=True)
DOCUMENTS = ["".join(LINES[i:i + 4]) for i in range(0, len(LINES), 4)]
N_TRAIN = 17


def write_folder(root):
    folder = root / "folder"
    (folder / "more").mkdir(parents=True)
    for i, doc in enumerate(DOCUMENTS):  # names sort in document order, some in a subfolder
        (folder / ("more" if i >= 10 else "") / f"{i:02d}.txt").write_text(doc)
    (folder / "picture.png").write_bytes(b"\x89PNG not text")  # not a text file: left out
    (folder / ".hidden.txt").write_text("not a document")
    return folder


def write_jsonl(root):
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(DOCUMENTS)))
    return path


def write_parquet(root):
    path = root / "docs.parquet"
    pq.write_table(pa.table({"text": DOCUMENTS, "id": list(range(len(DOCUMENTS)))}), path, row_group_size=5)
    return path


def write_dataset(root):
    import datasets

    path = root / "saved"
    datasets.Dataset.from_dict({"text": DOCUMENTS}).save_to_disk(str(path))
    return path


def prepared(root, tokenizer, **settings):
    data = Preparation(data_dir=str(root / "data"), tokenizer=tokenizer, url=None, cache_dir=str(root / "cache"),
                       block_size=8, **settings)
    data.prepare_data()
    return data


CORPORA = {"folder": (write_folder, "input_file"), "glob": (None, "input_file"), "jsonl": (write_jsonl, "input_file"),
           "parquet": (write_parquet, "input_file"), "dataset": (write_dataset, "dataset")}


def corpus_settings(kind, root):
    if kind == "glob":
        write_folder(root)
        return {"input_file": str(root / "folder" / "**" / "*.txt")}
    write, key = CORPORA[kind]
    return {key: str(write(root))}


@pytest.mark.parametrize("kind", CORPORA)
@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_each_document_is_its_tokens_and_one_end_of_text(kind, tokenizer, tmp_path, capsys):
    data = prepared(tmp_path, tokenizer, **corpus_settings(kind, tmp_path))
    tok = tokenizer_from_meta(data.meta["tokenizer"])
    assert tok.eot_token == tok.vocab_size - 1 if tokenizer == "char" else tok.eot_token == 50256
    expected = [np.concatenate([tok.encode_array(doc), [tok.eot_token]]) for doc in DOCUMENTS]
    assert data.meta["documents"] == {"train": N_TRAIN, "val": len(DOCUMENTS) - N_TRAIN}
    for split, docs in (("train", expected[:N_TRAIN]), ("val", expected[N_TRAIN:])):
        np.testing.assert_array_equal(split_tokens(data.prepared_dir, data.meta, split), np.concatenate(docs))
    assert sum(data.meta["tokens"].values()) == sum(len(tok.encode(doc)) + 1 for doc in DOCUMENTS)
    val_text = tok.decode(split_tokens(data.prepared_dir, data.meta, "val").tolist())
    assert val_text == "".join(doc + EOT_TEXT for doc in DOCUMENTS[N_TRAIN:])


def test_pieces_cut_where_the_tokens_stay_the_same():
    text = SONNETS.read_text() + "  double  spaces,\ttabs\t\tand\n\n\nblank lines  \n" * 20
    tok = GPT2Tokenizer()
    pieces = list(pieces_of(iter([text[i:i + 50] for i in range(0, len(text), 50)]), size=100))
    assert "".join(pieces) == text and len(pieces) > 20 and max(map(len, pieces)) <= 200
    assert np.array_equal(np.concatenate([tok.encode_array(p) for p in pieces]), tok.encode_array(text))
    assert cut("no-place-to-cut") == 0 and cut("a b") == 1 and cut("a  b") == 0


def test_identity_is_the_bytes_and_names_not_the_place(tmp_path):
    """A folder moved elsewhere keeps its identity; one file of it edited or renamed, or the same text as one
    file, is other data (the order of the documents, and their end-of-text tokens, come from the names)."""
    folder = write_folder(tmp_path)
    first = prepared(tmp_path, "char", input_file=str(folder))
    moved = folder.rename(tmp_path / "moved")
    again = prepared(tmp_path, "char", input_file=str(moved))
    assert again.prepared_dir == first.prepared_dir and again.meta["source_sha256"] == first.meta["source_sha256"]
    (moved / "03.txt").rename(moved / "03-renamed.txt")
    renamed = prepared(tmp_path, "char", input_file=str(moved))
    assert renamed.prepared_dir != first.prepared_dir
    one_file = tmp_path / "one.txt"
    one_file.write_text("".join(DOCUMENTS))
    assert prepared(tmp_path, "char", input_file=str(one_file)).identity["source_sha256"] != first.identity[
        "source_sha256"]


def test_each_file_is_read_for_its_hash_once(tmp_path, monkeypatch):
    folder = write_folder(tmp_path)
    prepared(tmp_path, "gpt2", input_file=str(folder))
    calls = []
    monkeypatch.setattr(sources, "_text_info", lambda path: calls.append(path))
    found = Preparation(data_dir=str(tmp_path / "data"), tokenizer="gpt2", input_file=str(folder),
                        cache_dir=str(tmp_path / "cache"))
    assert found.meta["documents"] == {"train": N_TRAIN, "val": len(DOCUMENTS) - N_TRAIN} and calls == []


def test_a_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + SONNETS.read_bytes())
    data = prepared(tmp_path, "char", input_file=str(path))
    assert "\ufeff" not in data.meta["tokenizer"]["chars"]
    assert data.meta["tokens"] == {"train": 2748, "val": 306}


def refusal(tmp_path, **settings) -> str:
    with pytest.raises(UserError) as refused:
        prepared(tmp_path, "char", **settings)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_one_line_refusals(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "image.png").write_bytes(b"png")
    assert "is a folder with no text files" in refusal(tmp_path, input_file=str(empty))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"body": "elsewhere"}\n')
    assert refusal(tmp_path, input_file=str(jsonl)).startswith(
        f"{jsonl}:2 has no text field 'text'; name the field holding the text with data.text_field=NAME")
    folder = write_folder(tmp_path)
    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    message = refusal(tmp_path, input_file=str(folder))
    assert message.startswith(f"{folder / 'latin1.txt'} is not UTF-8 text (byte 3 is not); convert it (iconv -f "
                              "LATIN1 -t UTF-8 ") and "leave it out" in message
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes(SONNETS.read_text().encode("utf-16-le"))
    assert refusal(tmp_path, input_file=str(utf16)) == (
        f"{utf16} looks like UTF-16LE text, not UTF-8; convert it: iconv -f UTF-16LE -t UTF-8 {utf16} > {utf16}.utf8")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": SONNETS.read_text()}))
    assert "holds 1 document(s), too few for a train and a validation split" in refusal(tmp_path, input_file=str(one))


def test_without_datasets_installed_the_refusal_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert refusal(tmp_path, dataset="roneneldan/TinyStories") == (
        "data.dataset needs the datasets library: pip install -e '.[hf]'")


def test_a_dataset_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    message = refusal(tmp_path, dataset="nobody/no-such-dataset")
    assert message.startswith("cannot load the dataset nobody/no-such-dataset (")
    assert message.endswith("; check its name on https://huggingface.co/datasets and the network, or pass a copy "
                            "saved with save_to_disk: data.dataset=PATH")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("preset, dataset, subset", [("openwebtext", "Skylion007/openwebtext", None),
                                                     ("fineweb_edu", "HuggingFaceFW/fineweb-edu", "sample-10BT"),
                                                     ("tinystories", "roneneldan/TinyStories", None)])
def test_dataset_presets_compose(preset, dataset, subset, tmp_path):
    data = compose_train_config([f"data={preset}"]).data
    assert (data.dataset, data.subset, data.split, data.tokenizer) == (dataset, subset, "train", "gpt2")
    command = Preparation(**{key: data[key] for key in ("data_dir", "dataset", "subset", "split")},
                          tokenizer="gpt2").prepare_command()
    assert command.startswith(f"python scripts/prepare.py data=hf data.dataset={dataset} ")
