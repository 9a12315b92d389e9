"""Evaluating a checkpoint: the exact full-pass loss, perplexity and bits per byte, its settings and refusals.

One tiny char-level model is trained; the BPE bits-per-byte check uses a random-weight GPT built in process.
"""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from helpers import ROOT, SONNETS, TINY_RUN, prepare_text, run_script
from nanogpt_lightning.config import EVAL_RULES, validate_eval_config
from nanogpt_lightning.data.tokenizer import GPT2Tokenizer
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.tools.evaluate import evaluate, measure
from nanogpt_lightning.train.checkpoints import load_checkpoint, resolve_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A char model trained a few iterations on the sonnets, its data prepared under <tmp>/data/text."""
    tmp = tmp_path_factory.mktemp("evaluation")
    run_script("train.py", *TINY_RUN, f"data.data_dir={tmp / 'data' / 'text'}", "trainer.max_steps=20",
               "eval_interval=20", f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    return tmp / "run"


def quiet(run: Path, **settings) -> dict:
    return evaluate(str(run), **{"data_dir": str(run.parent / "data"), "device": "cpu", "out": io.StringIO(),
                                 **settings})


def reference_loss(model: GPT, ids: list[int]) -> float:
    """Written from the definition: each window of block_size + 1 tokens, stepping by block_size, through the
    model's forward and F.cross_entropy; the windows' losses averaged by the tokens each predicts."""
    block = model.config.block_size
    losses, counts = [], []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block):
            window = torch.tensor(ids[start:start + block + 1])
            logits = model.lm_head(model.hidden_states(window[None, :-1]))[0]
            losses.append(F.cross_entropy(logits, window[1:]).item())
            counts.append(len(window) - 1)
    assert counts[-1] < block  # the test covers a last, partial window
    return float(np.dot(losses, counts) / sum(counts))


def test_loss_is_the_mean_over_every_window_of_the_split(run):
    model, _, checkpoint = load_checkpoint(resolve_checkpoint(str(run)), CPU)
    [directory] = (run.parent / "data" / "text").iterdir()
    val = np.fromfile(directory / "val.bin", dtype=np.uint16).astype(int).tolist()
    report = quiet(run, batch_size=3)
    assert report["evaluated"] == f"val split of {directory}"
    assert report["tokens"] == len(val) - 1 == report["bytes"]
    assert report["loss"] == pytest.approx(reference_loss(model, val), rel=1e-6)
    assert quiet(run, batch_size=1000)["loss"] == pytest.approx(report["loss"], rel=1e-6)  # batching changes nothing
    assert quiet(run, split="train")["tokens"] == checkpoint["nanogpt_lightning"]["data"]["tokens"]["train"] - 1


def test_same_output_twice_and_perplexity_is_exp_loss(run):
    first, second = io.StringIO(), io.StringIO()
    reports = [quiet(run, out=first), quiet(run, out=second)]
    for report in reports:
        assert report.pop("seconds") >= 0
    assert reports[0] == reports[1]
    # the printed lines too, less the time at the end of the last
    assert first.getvalue().rsplit(" in ", 1)[0] == second.getvalue().rsplit(" in ", 1)[0]
    assert reports[0]["perplexity"] == math.exp(reports[0]["loss"])
    assert "non-overlapping windows of block_size+1 = 17 tokens stepping by 16" in first.getvalue()


def test_bits_per_byte_of_an_ascii_char_model_is_loss_over_ln2(run):
    report = quiet(run, text=str(SONNETS))
    assert report["tokens"] == report["bytes"] == len(SONNETS.read_bytes()) - 1
    assert report["bits_per_byte"] == pytest.approx(report["loss"] / math.log(2), rel=1e-12)
    assert report["trained_on"].startswith("sonnets.txt (sha256 ")


def test_bpe_bits_per_byte_counts_the_utf8_bytes_of_the_predicted_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, vocab_multiple=64)).eval()
    tokenizer = GPT2Tokenizer()
    text = "A naïve café in 東京, déjà vu 😀 — über straße, 30 °C, ½ of π."
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.encode("A")[0]  # the one token not predicted is 1 byte
    predicted_bytes = len(text.encode("utf-8")) - 1
    result = measure(model, tokenizer, np.array(ids), batch_size=2)
    assert result.bytes == predicted_bytes > result.tokens == len(ids) - 1
    loss = reference_loss(model, ids)
    assert result.loss == pytest.approx(loss, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(loss / math.log(2) * (len(ids) - 1) / predicted_bytes, rel=1e-6)


def test_script_prints_one_json_object_and_writes_nothing(run, tmp_path):
    result = run_script("eval.py", f"ckpt={run}", f"data_dir={run.parent / 'data'}", "split=train", "format=json",
                        cwd=tmp_path)
    report = json.loads(result.stdout)
    expected = quiet(run, split="train")
    assert report.keys() == expected.keys()
    assert report["loss"] == pytest.approx(expected["loss"], rel=1e-9)
    assert (report["tokens"], report["bytes"], report["trained_on"]) == (
        expected["tokens"], expected["bytes"], expected["trained_on"])
    assert result.stderr == ""
    assert {p.name for p in tmp_path.iterdir()} <= {"cache"}  # at most run_script's; no outputs/, .hydra or log


def one_line_refusal(run: Path, **settings) -> str:
    with pytest.raises(UserError) as err:
        quiet(run, **settings)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_missing_text_file_is_refused(run, tmp_path):
    assert one_line_refusal(run, text=str(tmp_path / "nope.txt")) == (
        f"cannot read the text file {tmp_path / 'nope.txt'} (FileNotFoundError); pass text=FILE, a UTF-8 text file")


def test_characters_outside_the_vocabulary_are_named(run, tmp_path):
    (tmp_path / "accents.txt").write_text("café über")
    assert "(characters not in the vocabulary: 'é' 'ü')" in one_line_refusal(run, text=str(tmp_path / "accents.txt"))


def test_data_other_than_the_checkpoints_is_refused_naming_its_data(run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(SONNETS.read_text()[:2000])
    prepare_text(other, tmp_path / "data", "char")
    message = one_line_refusal(run, data_dir=str(tmp_path / "data"))
    assert message.startswith(f"no prepared data under {tmp_path / 'data'} is the data checkpoint ")
    assert "was trained on (sonnets.txt (sha256 " in message
    assert message.endswith(f"python scripts/prepare.py data=text data.input_file={SONNETS} data.tokenizer=char "
                            "data.val_fraction=0.1")


def test_every_setting_has_a_rule_and_split_and_text_exclude_each_other():
    cfg = OmegaConf.load(ROOT / "conf" / "eval.yaml")
    assert set(cfg) - {"defaults", "hydra"} == set(EVAL_RULES)
    validate_eval_config(cfg)
    cfg.split, cfg.text = "train", "my.txt"
    with pytest.raises(UserError, match="^split=train and text=my.txt both name what to evaluate; pass one$"):
        validate_eval_config(cfg)
    cfg.text, cfg.split = None, "test"
    with pytest.raises(UserError, match="^split must be one of val, train or null, got 'test'; pass e.g. split=val$"):
        validate_eval_config(cfg)
