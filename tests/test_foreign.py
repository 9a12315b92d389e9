"""Files from elsewhere (issue 22): what the scripts write over, and what they read that this project did not
write, or that a newer version wrote; each problem is one line naming the file or setting, exit status 1."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import TINY_RUN, run_script
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.tools.export import export
from nanogpt_lightning.train.checkpoints import CHECKPOINT_KEY, FORMAT_VERSION, load_checkpoint, load_model
from test_train import train_in_process


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny char-level and a tiny GPT-2 BPE run, trained in this process (their last.ckpt)."""
    tmp = tmp_path_factory.mktemp("foreign")
    for tokenizer in ("char", "gpt2"):
        train_in_process(tmp / tokenizer, f"data.tokenizer={tokenizer}", f"data.data_dir={tmp / tokenizer}_data",
                         "trainer.max_steps=2", "eval_interval=2")
    return {name: tmp / name / "checkpoints" / "last.ckpt" for name in ("char", "gpt2")}


def one_line_error(result, *expected: str) -> str:
    """The script's refusal: exit status 1, one line on stderr, no traceback, holding each of `expected`."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# --- 1. export never overwrites ---

def test_export_with_an_empty_out_is_refused_and_writes_nothing(runs, tmp_path):
    result = run_script("export.py", f"ckpt={runs['char']}", "out=", cwd=tmp_path, check=False)
    one_line_error(result, "out is empty; pass out=DIR")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []


def test_export_refuses_a_non_empty_out_unless_overwrite_and_leaves_no_stale_files(runs, tmp_path, capsys):
    out = tmp_path / "export"
    export(str(runs["gpt2"]), str(out))
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    with pytest.raises(UserError, match=f"out={out} already holds files; pass overwrite=true"):
        export(str(runs["char"]), str(out))
    assert (out / "vocab.json").is_file()  # untouched
    capsys.readouterr()
    export(str(runs["char"]), str(out), overwrite=True)
    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.json", "model.safetensors", "nanogpt_tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary sibling left
    assert f"to {out}: {', '.join(written)}" in capsys.readouterr().out  # the line lists every file written
    config = json.loads((out / "config.json").read_text())
    assert "bos_token_id" not in config and "eos_token_id" not in config  # GPT-2's 50256 is not a character


def test_export_into_an_empty_existing_directory_is_no_overwrite(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    export(str(runs["char"]), str(tmp_path / "empty"))
    assert (tmp_path / "empty" / "model.safetensors").is_file()


# --- 2. a switched optimizer on resume ---

def test_resuming_an_adamw_run_with_muon_is_one_line(runs, tmp_path):
    run = runs["char"].parent.parent
    result = run_script("train.py", *TINY_RUN, "data.tokenizer=char", f"data.data_dir={run}_data",
                        f"hydra.run.dir={tmp_path / 'resumed'}", f"ckpt_path={runs['char']}", "optimizer=muon",
                        "trainer.max_steps=4", cwd=tmp_path, check=False)
    one_line_error(result, "other settings: optimizer._target_=nanogpt_lightning.train.optimizers.muon "
                           "(checkpoint: nanogpt_lightning.train.optimizers.adamw)", "optimizer.momentum=0.95")


# --- 3. checkpoints with a format version ---

def _newer_format(c):
    c[CHECKPOINT_KEY]["format_version"] = FORMAT_VERSION + 1


def _newer_setting(c):
    c[CHECKPOINT_KEY]["model_config"]["swiglu"] = True


def _no_weight(c):
    del c["state_dict"]["model.transformer.ln_f.weight"]


def _extra_weight(c):
    c["state_dict"]["model.transformer.extra.weight"] = torch.zeros(2)


def _bad_value(c):
    c[CHECKPOINT_KEY]["model_config"]["n_head"] = "two"


@pytest.mark.parametrize("edit, refused", [
    (_newer_format, rf"written by a newer version of nanogpt-lightning \(format {FORMAT_VERSION + 1}, this one "
                    rf"reads up to {FORMAT_VERSION}\): upgrade nanogpt-lightning"),
    (lambda c: c.pop("state_dict"), "lacks its state_dict"),
    (lambda c: [c[CHECKPOINT_KEY].pop(k) for k in ("model_config", "tokenizer")], "lacks its model_config, tokenizer"),
    (_newer_setting, r"model settings this version does not know \(swiglu\): .*upgrade nanogpt-lightning"),
    (_bad_value, r"model config this version cannot build \(ValueError: model.n_head must be a positive integer"),
    (_no_weight, r"weights do not fit its model config \(transformer.ln_f.weight missing\)"),
    (_extra_weight, r"weights do not fit its model config \(transformer.extra.weight unexpected\)"),
])
def test_an_edited_checkpoint_is_refused_in_one_line(runs, tmp_path, edit, refused):
    checkpoint = torch.load(runs["char"], map_location="cpu", weights_only=True)
    assert checkpoint[CHECKPOINT_KEY]["format_version"] == FORMAT_VERSION
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(UserError, match=refused) as err:
        load_checkpoint(tmp_path / "edited.ckpt", torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_an_edited_checkpoint_is_refused_by_the_script_with_status_1(runs, tmp_path):
    checkpoint = torch.load(runs["char"], map_location="cpu", weights_only=True)
    _newer_format(checkpoint)
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    result = run_script("sample.py", f"ckpt={tmp_path / 'edited.ckpt'}", "max_new_tokens=2", cwd=tmp_path,
                        check=False)
    one_line_error(result, "upgrade nanogpt-lightning")


# --- 4. a foreign config.json, tokenizer file and weights (pretrained / exported DIR) ---

@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> Path:
    return export(str(runs["char"]), str(tmp_path_factory.mktemp("exported") / "char"))


def edited_copy(exported: Path, tmp_path: Path, name: str, content) -> Path:
    """A copy of the export with `name` replaced by `content` (text, or a function of the parsed JSON)."""
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    if callable(content):
        content = json.dumps(content(json.loads((copy / name).read_text())))
    (copy / name).write_text(content)
    return copy


@pytest.mark.parametrize("name, content, refused", [
    ("config.json", "[]", r"config.json is not a JSON object \(got list\)"),
    ("config.json", "{}", "its config.json lacks vocab_size"),
    ("config.json", "not json", r"cannot read .*config.json \(JSONDecodeError"),
    ("config.json", lambda c: {**c, "n_embd": "32"}, "its config.json's n_embd must be a positive integer, got '32'"),
    ("config.json", lambda c: {**c, "vocab_size": 1e12}, "vocab_size must be a positive integer, got 1000000000000.0"),
    ("config.json", lambda c: {**c, "vocab_size": 10**12}, "parameters .*over the 2e\\+10 this loads"),
    ("config.json", lambda c: {**c, "vocab_size": c["vocab_size"] + 1},
     r"do not fit its config.json: wte.weight is \(\d+, 32\), config.json makes it \(\d+, 32\)"),
    ("nanogpt_tokenizer.json", "not json", "cannot read .*nanogpt_tokenizer.json"),
    ("nanogpt_tokenizer.json", "[1, 2]", "nanogpt_tokenizer.json is not a tokenizer description"),
    ("nanogpt_tokenizer.json", lambda m: {**m, "chars": m["chars"][:-1]},
     r"nanogpt_tokenizer.json has \d+ characters, the model's vocab_size is \d+"),
])
def test_a_damaged_export_is_refused_in_one_line(exported, tmp_path, name, content, refused):
    copy = edited_copy(exported, tmp_path, name, content)
    with pytest.raises(UserError, match=refused) as err:
        load_model(str(copy), torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_a_damaged_config_json_is_refused_by_the_script_with_status_1(exported, tmp_path):
    copy = edited_copy(exported, tmp_path, "config.json", "[]")
    one_line_error(run_script("sample.py", f"ckpt={copy}", cwd=tmp_path, check=False), "is not a JSON object")


# --- 5. files that are not regular files ---

@pytest.mark.parametrize("script, setting, refused", [
    ("eval.py", "text={}", "the text file {} is not a regular file; pass text=FILE"),
    ("sample.py", "prompt=FILE:{}", "the prompt file {} is not a regular file; pass prompt=FILE:path.txt"),
])
def test_a_fifo_is_refused_not_read(runs, tmp_path, script, setting, refused):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = run_script(script, f"ckpt={runs['char']}", setting.format(fifo), "device=cpu", cwd=tmp_path,
                        check=False)  # before: blocked until the 300 s timeout
    one_line_error(result, refused.format(fifo))


# --- 6. interpolations: resolved once, checked and used ---

def test_sample_uses_the_resolved_interpolation(runs, tmp_path):
    result = run_script("sample.py", f"ckpt={runs['char']}", "num_samples=1", "max_new_tokens=${num_samples}",
                        "device=cpu", cwd=tmp_path)  # before: TypeError (the string '${num_samples}' passed on)
    assert "Traceback" not in result.stderr


def test_export_out_from_an_environment_variable_is_the_resolved_path(runs, tmp_path):
    run_script("export.py", f"ckpt={runs['char']}", "out=${oc.env:EXPORT_HOME}/x", cwd=tmp_path,
               env={"EXPORT_HOME": str(tmp_path / "home")})
    assert (tmp_path / "home" / "x" / "model.safetensors").is_file()
    assert not list(tmp_path.glob("$*"))  # before: a directory literally named ${oc.env:EXPORT_HOME}


def test_checked_settings_check_the_values_they_return():
    from omegaconf import OmegaConf

    from nanogpt_lightning.config import checked_settings, validate_sample_config

    cfg = OmegaConf.create({"num_samples": 2, "max_new_tokens": "${num_samples}", "prompt": "x"})
    assert checked_settings(cfg, validate_sample_config) == {"num_samples": 2, "max_new_tokens": 2, "prompt": "x"}
    with pytest.raises(UserError, match="max_new_tokens cannot be resolved"):
        checked_settings(OmegaConf.create({"max_new_tokens": "${nothing}"}), validate_sample_config)


# --- 7. model.init_from: the weights held against the data before anything trains ---

GPT2_DATA = {"kind": "gpt2", "vocab_size": 50257}


@pytest.fixture(scope="module")
def small_vocabulary_gpt2(tmp_path_factory) -> Path:
    """A GPT-2 of 1000 tokens and 64 positions, saved by transformers (as someone else's would be)."""
    import transformers

    directory = tmp_path_factory.mktemp("vocab1000")
    config = transformers.GPT2Config(vocab_size=1000, n_layer=1, n_head=2, n_embd=32, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def char_tokenizer(runs) -> dict:
    return torch.load(runs["char"], map_location="cpu", weights_only=True)[CHECKPOINT_KEY]["tokenizer"]


@pytest.mark.parametrize("source, data, block_size, refused", [
    ("vocab1000", "gpt2", 16, "model.init_from={} has a vocabulary of 1000 tokens, the data is in GPT-2's byte-pair "
                              "encoding of 50257; pass weights with GPT-2's whole vocabulary"),
    ("vocab1000", "gpt2", 128, "data.block_size=128 is larger than the 64 positions of model.init_from={}; "
                               "pass data.block_size=64 or less"),
    ("char", "gpt2", 16, "model.init_from={} was trained on a char vocabulary of {n} tokens, the data here has a "
                         "gpt2 vocabulary of 50257 tokens; train on data of the checkpoint's tokenizer"),
    ("char", "other chars", 16, "the data here has a char vocabulary of 2 tokens"),
    ("char", "char", 32, "data.block_size=32 is larger than the 16 positions of model.init_from={}"),
])
def test_init_from_weights_that_do_not_fit_the_data_is_one_line(runs, small_vocabulary_gpt2, source, data,
                                                                  block_size, refused):
    from nanogpt_lightning.train.checkpoints import init_from

    spec = str(small_vocabulary_gpt2 if source == "vocab1000" else runs["char"].parent.parent)  # a run directory
    tokenizer = {"gpt2": GPT2_DATA, "char": char_tokenizer(runs),
                 "other chars": {"kind": "char", "chars": "ab", "vocab_size": 2}}[data]
    with pytest.raises(UserError) as err:  # before: IndexError at the first batch (GPT-2), or no such option
        init_from(spec, tokenizer, block_size, {})
    assert refused.format(spec, n=char_tokenizer(runs)["vocab_size"]) in str(err.value)
    assert "\n" not in str(err.value)


def test_init_from_a_foreign_gpt2_of_another_vocabulary_leaves_no_run_directory(small_vocabulary_gpt2, tmp_path):
    result = run_script("train.py", *TINY_RUN, "data.tokenizer=gpt2", f"data.data_dir={tmp_path / 'data'}",
                        f"model.init_from={small_vocabulary_gpt2}", f"hydra.run.dir={tmp_path / 'run'}",
                        cwd=tmp_path, check=False)
    one_line_error(result, "has a vocabulary of 1000 tokens")
    assert not (tmp_path / "run").exists()  # before: tensorboard/ left, and the same command refused


def test_init_from_a_run_directory_trains_from_its_weights_with_new_settings(runs, tmp_path):
    """Weights from a checkpoint, a fresh optimizer and schedule: another learning rate and a shorter block
    (a resume refuses both)."""
    source = runs["char"].parent.parent
    printed = train_in_process(tmp_path / "run", "data.tokenizer=char", f"data.data_dir={source}_data",
                               f"model.init_from={source}", "optimizer.lr=1e-9", "data.block_size=8",
                               "trainer.max_steps=2", "eval_interval=2")
    assert f"init_from {runs['char']} (step 2): 1 layers, 2 heads, n_embd 32, positions cropped to 8" in printed
    before = torch.load(runs["char"], map_location="cpu", weights_only=True)
    after = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 2  # counted from 0: a new run
    assert after[CHECKPOINT_KEY]["model_config"]["block_size"] == 8
    assert after[CHECKPOINT_KEY]["settings"]["optimizer.lr"] == 1e-9
    torch.testing.assert_close(after["state_dict"]["model.transformer.wpe.weight"],
                               before["state_dict"]["model.transformer.wpe.weight"][:8], atol=1e-6, rtol=0)
