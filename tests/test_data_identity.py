"""Which prepared directory a local text gets: keyed by its bytes (SHA-256), tokenizer and val_fraction, never by
its path, so other data never reuses a directory and the same data never gets two."""

import json
import shutil

from helpers import SONNETS, prepare_text


def test_another_val_fraction_gets_its_own_directory(tmp_path):
    tenth = prepare_text(SONNETS, tmp_path / "data", "char", val_fraction=0.1)
    fifth = prepare_text(SONNETS, tmp_path / "data", "char", val_fraction=0.2)
    assert tenth != fifth
    assert json.loads((tenth / "meta.json").read_text())["val_fraction"] == 0.1
    assert json.loads((fifth / "meta.json").read_text())["val_fraction"] == 0.2
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted([tenth.name, fifth.name])


def test_a_renamed_copy_of_the_same_bytes_shares_the_directory(tmp_path):
    elsewhere = tmp_path / "copies" / "renamed.txt"
    elsewhere.parent.mkdir()
    shutil.copyfile(SONNETS, elsewhere)
    original = prepare_text(SONNETS, tmp_path / "data", "char")
    written = (original / "train.bin").stat().st_mtime_ns
    copy = prepare_text(elsewhere, tmp_path / "data", "char")
    assert copy == original
    assert (copy / "train.bin").stat().st_mtime_ns == written  # reused, not rebuilt
    assert [p.name for p in (tmp_path / "data").iterdir()] == [original.name]


def test_an_edited_file_at_the_same_path_gets_a_new_directory(tmp_path):
    text = tmp_path / "input.txt"
    text.write_bytes(SONNETS.read_bytes())
    before = prepare_text(text, tmp_path / "data", "char")
    text.write_bytes(SONNETS.read_bytes().replace(b"love", b"lave", 1))  # same length, one byte other
    after = prepare_text(text, tmp_path / "data", "char")
    assert after != before
    assert json.loads((after / "meta.json").read_text())["source_sha256"] != json.loads(
        (before / "meta.json").read_text())["source_sha256"]
    assert (before / "meta.json").is_file()  # the old data stays whole for the runs trained on it
