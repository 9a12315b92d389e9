"""Bits per byte against the test's own arithmetic, on a BPE text whose tokens hold 1 to 4+ bytes.

Training's val/train bpb: every evaluation batch the module sees is re-scored here from the definition
(per-token cross-entropy of the model's logits, weighted by the UTF-8 bytes of the predicted tokens, each
decoded alone), and the evaluation's logged value must equal sum(nats) / (ln 2 x sum(bytes)). eval.py on a
text whose first and last tokens differ in byte length: the bytes counted must be those of the predicted
tokens (all but the first), not of the inputs (all but the last).
"""

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import ROOT, run_script
from nanogpt_lightning.data.datamodule import TextDataModule
from nanogpt_lightning.data.tokenizer import GPT2Tokenizer
from nanogpt_lightning.metrics import EVAL_BPB_TAGS, EVAL_LOSS_TAGS, SPLITS
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.train.module import GPTModule
from nanogpt_lightning.train.optimizers import adamw
from nanogpt_lightning.train.schedules import WarmupCosineLR

MULTIBYTE = ROOT / "tests" / "data" / "multibyte.txt"  # ASCII, accents, CJK, Hangul, Cyrillic, emoji
GPT2 = GPT2Tokenizer()


def utf8_bytes(ids) -> int:
    """The bytes of the tokens `ids`, each decoded alone (a BPE token may hold part of a character)."""
    return sum(len(GPT2._encoding.decode_single_token_bytes(int(i))) for i in ids)


def token_losses(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (nats) from the logits, not through the model's (fused) loss."""
    with torch.no_grad():
        logits = model.lm_head(model.hidden_states(x)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none").double()


class Rescore(L.Callback):
    """Re-scores every evaluation batch; keeps the last evaluation's per-batch sums for each split."""

    def __init__(self):
        self.batches = {split: [] for split in SPLITS}  # (nats, bytes, tokens, input bytes) per batch

    def on_validation_epoch_start(self, trainer, pl_module):
        self.batches = {split: [] for split in SPLITS}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        losses = token_losses(pl_module.model, x, y)
        self.batches[SPLITS[dataloader_idx]].append(
            (losses.sum().item(), utf8_bytes(y.flatten()), y.numel(), utf8_bytes(x.flatten())))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT trained in process on the multi-byte text with GPT-2's BPE, evaluated at its last step."""
    tmp = tmp_path_factory.mktemp("bpb")
    data = TextDataModule(data_dir=str(tmp / "data"), tokenizer="gpt2", input_file=str(MULTIBYTE), block_size=16,
                          batch_size=1, eval_iters=6)
    data.prepare_data()
    torch.manual_seed(0)
    module = GPTModule(GPTConfig(block_size=16, vocab_size=data.vocab_size, n_layer=1, n_head=1, n_embd=8),
                       data.meta["tokenizer"], optimizer=partial(adamw, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.99)),
                       scheduler=partial(WarmupCosineLR, warmup_iters=1, lr_decay_iters=10, min_lr=1e-4))
    rescore = Rescore()
    trainer = L.Trainer(logger=False, max_steps=10, max_epochs=-1, val_check_interval=10, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, accelerator="cpu", devices=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rescore])
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp / "bpe.ckpt")
    return trainer, rescore.batches, tmp


@pytest.mark.parametrize("split", SPLITS)
def test_training_bpb_is_the_byte_weighted_nats_of_the_predicted_tokens(trained, split):
    trainer, batches, _ = trained
    nats, n_bytes, n_tokens, input_bytes = (np.array(column, dtype=np.float64) for column in zip(*batches[split]))
    assert len(nats) == 6
    expected = nats.sum() / (math.log(2) * n_bytes.sum())
    logged = trainer.callback_metrics[EVAL_BPB_TAGS[split]].item()
    assert logged == pytest.approx(expected, rel=1e-5)
    assert trainer.callback_metrics[EVAL_LOSS_TAGS[split]].item() == pytest.approx(nats.sum() / n_tokens.sum(),
                                                                                  rel=1e-5)
    # the test can tell the right weighting from the wrong ones it guards against
    loss_over_ln2 = nats.sum() / n_tokens.sum() / math.log(2)
    mean_of_batches = np.mean(nats / (math.log(2) * n_bytes))
    of_the_inputs = nats.sum() / (math.log(2) * input_bytes.sum())
    for wrong in (loss_over_ln2, mean_of_batches, of_the_inputs):
        assert wrong != pytest.approx(expected, rel=1e-4)


def test_eval_script_counts_the_bytes_of_the_predicted_tokens_not_the_inputs(trained, tmp_path):
    _, _, run = trained
    text = "A café in 東京 with 😀, déjà vu — über straße; 30 °C and ½ of π, then 火"
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    ids = GPT2.encode(text)
    assert utf8_bytes(ids[:1]) != utf8_bytes(ids[-1:])  # else inputs and targets hold the same bytes
    result = run_script("eval.py", f"ckpt={run / 'bpe.ckpt'}", f"text={tmp_path / 'text.txt'}", "format=json",
                        "device=cpu", cwd=tmp_path)
    report = json.loads(result.stdout)

    # the test's own pass: windows of block_size + 1 tokens stepping by block_size, losses from the logits
    model = GPT(GPTConfig(block_size=16, vocab_size=GPT2.vocab_size, n_layer=1, n_head=1, n_embd=8))
    state = torch.load(run / "bpe.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    model.eval()
    nats = 0.0
    for start in range(0, len(ids) - 1, 16):
        window = torch.tensor(ids[start:start + 17])
        nats += token_losses(model, window[None, :-1], window[None, 1:]).sum().item()
    predicted_bytes = utf8_bytes(ids[1:])
    assert predicted_bytes == len(text.encode("utf-8")) - utf8_bytes(ids[:1])
    assert (report["tokens"], report["bytes"]) == (len(ids) - 1, predicted_bytes)
    assert report["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(nats / (math.log(2) * predicted_bytes), rel=1e-5)


def test_the_multibyte_text_is_what_the_bpb_tests_need():
    text = Path(MULTIBYTE).read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) > 1.4 * len(text)  # mostly multi-byte characters by bytes
    assert any(ord(ch) > 0xFFFF for ch in text)  # 4-byte characters (emoji)
