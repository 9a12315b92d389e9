"""Finding, reading and checking checkpoints before a resume (checkpoints.py)."""

import pytest
import torch

from helpers import SONNETS
from nanogpt_lightning.errors import UserError, naming
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.train.checkpoints import (
    CHECKPOINT_KEY,
    check_resumable,
    check_same_data,
    check_same_settings,
    read_checkpoint,
    resolve_checkpoint,
)


def test_reading_refuses_files_that_are_not_our_checkpoints(tmp_path):
    with pytest.raises(UserError, match=f"cannot read checkpoint {SONNETS}, it is truncated or not a checkpoint"):
        read_checkpoint(SONNETS)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    with pytest.raises(UserError, match="not a nanogpt_lightning checkpoint; pass ckpt_path="), naming(key="ckpt_path"):
        read_checkpoint(foreign)


def test_a_run_directory_means_its_last_checkpoint_or_says_what_it_holds(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "best.ckpt").write_bytes(b"")
    (checkpoints / ".last.ckpt.123.partial").write_bytes(b"")  # a save that never finished
    with pytest.raises(UserError, match=f"no last.ckpt in {tmp_path / 'run'}/checkpoints or {tmp_path / 'run'}; "
                                        f"it holds best.ckpt: pass ckpt_path={checkpoints / 'best.ckpt'}"):
        with naming(key="ckpt_path"):
            resolve_checkpoint(tmp_path / "run")
    (checkpoints / "last.ckpt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path / "run") == checkpoints / "last.ckpt"
    with pytest.raises(UserError, match="does not exist; pass ckpt_path=FILE.ckpt"), naming(key="ckpt_path"):
        resolve_checkpoint(tmp_path / "missing.ckpt")


def saved(**record) -> dict:
    return {CHECKPOINT_KEY: record}


def test_a_resume_must_repeat_the_settings_that_shape_the_result(tmp_path, capsys):
    settings = {"optimizer.lr": 1e-3, "trainer.max_steps": 100, "seed": 1}
    checkpoint = saved(settings=settings)
    check_same_settings(checkpoint, {**settings, "trainer.max_steps": 200}, tmp_path, ("trainer.max_steps",))
    with pytest.raises(UserError, match=r"other settings: optimizer.lr=0.01 \(checkpoint: 0.001\), "
                                        r"seed=2 \(checkpoint: 1\); resume with the checkpoint's settings"):
        check_same_settings(checkpoint, {**settings, "optimizer.lr": 1e-2, "seed": 2}, tmp_path, ())
    capsys.readouterr()
    check_same_settings(saved(), {"seed": 2}, tmp_path, ())  # an older checkpoint recorded none: said, not refused
    assert capsys.readouterr().err == (f"warning: checkpoint {tmp_path} records no settings (an older version wrote "
                                       "it): this resume cannot check that the settings are the run's; resume with "
                                       "the settings it was trained with\n")
    # settings added to the project after the checkpoint was written keep the old behaviour by default
    check_same_settings(checkpoint, {**settings, "model.rotary": False, "budget_s": None}, tmp_path, ())
    with pytest.raises(UserError, match=r"other settings: optimizer.lr=None \(checkpoint: 0.001\)"):
        check_same_settings(checkpoint, {"trainer.max_steps": 100, "seed": 1}, tmp_path, ())  # one it had is gone


ADAMW, MUON = "nanogpt_lightning.train.optimizers.adamw", "nanogpt_lightning.train.optimizers.muon"


@pytest.mark.parametrize("saved_settings, settings, refused", [
    # a switched group: its target first, then every key the new group brings or lacks
    ({"optimizer._target_": ADAMW, "optimizer.lr": 1e-3}, {"optimizer._target_": MUON, "optimizer.lr": 1e-3,
                                                            "optimizer.momentum": 0.95},
     rf"optimizer._target_={MUON} \(checkpoint: {ADAMW}\), optimizer.momentum=0.95 \(checkpoint: None\);"),
    # the same group: a key only this run has is a setting newer than the checkpoint
    ({"optimizer._target_": ADAMW, "optimizer.lr": 1e-3}, {"optimizer._target_": ADAMW, "optimizer.lr": 1e-3,
                                                            "optimizer.new_knob": 1}, None),
    # a checkpoint from before `_target_` was recorded resumes
    ({"optimizer.lr": 1e-3}, {"optimizer._target_": MUON, "optimizer.lr": 1e-3}, None),
])
def test_a_switched_group_is_a_difference_a_newer_setting_is_not(tmp_path, saved_settings, settings, refused):
    if refused is None:
        check_same_settings(saved(settings=saved_settings), settings, tmp_path, ())
        return
    with pytest.raises(UserError, match=refused):
        check_same_settings(saved(settings=saved_settings), settings, tmp_path, ())


def test_a_resume_must_train_on_the_checkpoints_data(tmp_path):
    data = {"source": "/x/input.txt", "source_sha256": "a" * 64, "source_bytes": 10, "tokenizer": "char",
            "val_fraction": 0.1, "tokens": {"train": 9, "val": 1}}
    check_same_data(saved(data=data), dict(data), tmp_path)
    other = {**data, "source": "/x/other.txt", "source_sha256": "b" * 64}
    with pytest.raises(UserError, match=r"was trained on input.txt \(sha256 aaaaaaaaaaaa\.\.\., 10 bytes\), char "
                                        r"tokenizer, 10% val, this run's data is other.txt .* allow_other_data=true"):
        check_same_data(saved(data=data), other, tmp_path)
    check_same_data(saved(), other, tmp_path)  # an older checkpoint recorded none


def test_a_resume_must_repeat_the_model_shapes_and_the_block_size(tmp_path):
    checkpoint = saved(model_config=vars(GPTConfig(block_size=16, vocab_size=38, n_layer=1, n_head=2, n_embd=32)),
                       tokenizer={"kind": "char", "chars": "x", "vocab_size": 38})
    tokenizer = checkpoint[CHECKPOINT_KEY]["tokenizer"]
    check_resumable(checkpoint, GPTConfig(block_size=16, vocab_size=38, n_layer=1, n_head=2, n_embd=32), tokenizer,
                    tmp_path)
    with pytest.raises(UserError, match=r"trained with model.n_layer=1, model.n_embd=32 \(this run has 2, 64\); "
                                        r"resume with the same model.\* settings"):
        check_resumable(checkpoint, GPTConfig(block_size=16, vocab_size=38, n_layer=2, n_head=2, n_embd=64),
                        tokenizer, tmp_path)
    with pytest.raises(UserError, match=r"data.block_size=32 is larger than the checkpoint's block size 16 .*"
                                        r"resume with data.block_size=16"):
        check_resumable(checkpoint, GPTConfig(block_size=32, vocab_size=38, n_layer=1, n_head=2, n_embd=32),
                        tokenizer, tmp_path)
    with pytest.raises(UserError, match="vocabulary of 38 tokens, the data here has a char vocabulary of 40"):
        check_resumable(checkpoint, GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=32),
                        tokenizer, tmp_path)
