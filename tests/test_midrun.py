"""What happens to a run while it trains: its prepared data deleted, the first iteration of a compiled model under
a time budget. Runs go through the real script; the callbacks here act at a known iteration
(`+callbacks.NAME._target_=test_midrun.CLASS`; the subprocess finds this module on PYTHONPATH)."""

import re
import shutil
import time

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import ROOT, SONNETS, TINY_RUN, prepare_text, run_script
from nanogpt_lightning.data.datamodule import TextDataModule
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.train.callbacks import TimeBudget
from test_interrupt import losses
from test_train import step_of, train_in_process

SETTINGS = ["trainer.max_steps=12", "eval_interval=5", "log_interval=1"]


class DeleteDataAt(L.Callback):
    """Deletes the run's prepared data directory (meta.json and the .bin shards) when iteration `iteration`
    ends, as a user cleaning up data/ while a run trains would, but at a known moment."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.iteration:
            shutil.rmtree(trainer.datamodule.prepared_dir)


def test_prepared_data_deleted_while_training_the_run_goes_on_as_if_it_were_there_and_saves(tmp_path):
    """The shards are opened once, when training starts: the first evaluation, after the deletion, reads
    them too (it used to open them itself and end in a FileNotFoundError traceback, nothing saved)."""
    prepared = prepare_text(SONNETS, tmp_path / "data", "char")
    whole = train_in_process(tmp_path / "whole", *SETTINGS, f"data.data_dir={tmp_path / 'data'}")
    run = tmp_path / "run"
    deleted = run_script("train.py", *TINY_RUN, *SETTINGS, f"data.data_dir={tmp_path / 'data'}",
                         f"hydra.run.dir={run}", "+callbacks.delete_data._target_=test_midrun.DeleteDataAt",
                         "+callbacks.delete_data.iteration=3", cwd=tmp_path, env={"PYTHONPATH": str(ROOT / "tests")})
    assert not prepared.exists()
    assert "Traceback" not in deleted.stderr
    iters, steps = losses(deleted.stdout)
    assert sorted(steps) == [5, 10, 12]  # evaluated after the deletion, to the end
    assert (iters, steps) == losses(whole)  # on the same data
    assert "finished at iteration 12" in deleted.stdout
    assert step_of(run / "checkpoints" / "last.ckpt") == 12 and (run / "checkpoints" / "best.ckpt").exists()


def test_prepared_data_gone_before_its_shards_are_opened_is_one_line_saying_to_prepare_it_again(tmp_path):
    """Deleted between the check of its meta.json (the model is sized by it) and the start of training."""
    data = TextDataModule(data_dir=str(tmp_path / "data"), input_file=str(SONNETS), block_size=8, batch_size=2)
    data.prepare_data()
    assert data.vocab_size > 0
    shutil.rmtree(data.prepared_dir)
    with pytest.raises(UserError) as err:
        data.setup("fit")
    assert str(err.value) == (f"the prepared data in {data.prepared_dir} disappeared after it was checked; prepare it "
                              f"again with {data.prepare_command()}")
    assert "python scripts/prepare.py" in str(err.value)


def test_compiling_is_not_counted_in_the_time_budget_and_is_said_once(tmp_path, monkeypatch):
    """model.compile=true: torch.compile compiles inside the first iteration's forward. Here in this process,
    compiling is played by a first forward that sleeps COMPILING seconds (a real cold compile takes a minute or
    more on a CPU; test_precision.py compiles for real): against a budget of one second, the old clock ran
    out in the first iteration; now the budget counts the iterations after it, and so does the schedule."""
    from nanogpt_lightning.model.gpt import GPT

    compiling = 1.5
    forward, calls = GPT.forward, []

    def first_forward_compiles(self, *args, **kwargs):
        if not calls and torch.is_grad_enabled():
            time.sleep(compiling)
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(GPT, "forward", first_forward_compiles)
    monkeypatch.setattr("nanogpt_lightning.train.run.check_compile", lambda device: None)  # no compiler needed
    run = tmp_path / "run"
    printed = train_in_process(run, "model.compile=true", "budget_s=1", "eval_interval=100000", "log_interval=1",
                               f"data.data_dir={tmp_path / 'data'}")
    said = re.findall(r"^compiled in (\d+\.\d)s \(not counted in budget_s\)$", printed, re.M)
    assert len(said) == 1 and float(said[0]) >= compiling
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    counted = TimeBudget.seconds_trained(last)
    assert 1 <= counted < compiling and last["global_step"] > 2  # the old clock: 1 iteration, >= 1.5 s counted
    # nor did the schedule see it: the second iteration's rate (logged after the first) is a warmup's
    lrs = [event.value for event in EventAccumulator(str(run / "tensorboard")).Reload().Scalars("lr")]
    assert lrs[0] > 2 * lrs[-1] and lrs[-1] == pytest.approx(1e-4)  # scheduler.min_lr when the budget ends
