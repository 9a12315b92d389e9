"""A NaN loss through the real script: it stops with one line naming the last good checkpoint, or is skipped.

The NaN comes from PoisonLoss, a test-only callback added on the command line
(`+callbacks.poison._target_=test_nonfinite.PoisonLoss`); the subprocess finds this module on PYTHONPATH.
"""

import json
import os

import lightning as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import ROOT, TINY_RUN, run_script


class PoisonLoss(L.Callback):
    """Multiply the loss of iteration `iteration`'s micro-batches `micro_batches` by NaN (or inf).

    Writes `report` (JSON): whether that iteration left the parameters and the optimizer state untouched.
    """

    def __init__(self, iteration: int, micro_batches: list[int] = (0,), value: str = "nan", report: str = ""):
        self.iteration = iteration
        self.micro_batches = list(micro_batches)
        self.value = float(value)
        self.report = report

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.iteration - 1:
            return
        micro_batch = batch_idx % trainer.accumulate_grad_batches
        if micro_batch == 0:
            self._params = [p.detach().clone() for p in pl_module.parameters()]
            self._optimizer_steps = self._steps(trainer)
        if micro_batch in self.micro_batches:
            model, value = pl_module.model, self.value
            original = model.forward

            def poisoned(*args, **kwargs):
                del model.forward  # once
                logits, loss = original(*args, **kwargs)
                return logits, loss * value

            model.forward = poisoned

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.iteration and self.report and not os.path.exists(self.report):
            unchanged = all(torch.equal(a, b) for a, b in zip(self._params, pl_module.parameters()))
            with open(self.report, "w") as f:
                json.dump({"params_unchanged": unchanged,
                           "optimizer_steps_unchanged": self._steps(trainer) == self._optimizer_steps}, f)

    @staticmethod
    def _steps(trainer):
        return [float(s["step"]) for s in trainer.optimizers[0].state.values()]


def train(tmp_path, monkeypatch, *overrides):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    return run_script("train.py", *TINY_RUN, f"data.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}",
                      "+callbacks.poison._target_=test_nonfinite.PoisonLoss", *overrides, cwd=tmp_path, check=False)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    result = train(tmp_path, monkeypatch, "+callbacks.poison.iteration=5", "trainer.max_steps=8", "eval_interval=2")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: non-finite loss at iteration 5; last good checkpoint: {last} "
                      "(lower optimizer.lr, or pass module.skip_nonfinite=true to skip such steps)"]
    assert result.stderr.rstrip().endswith(errors[0])
    assert "iter 4:" in result.stdout and "iter 5:" not in result.stdout
    checkpoint = torch.load(last, weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 4  # written at the evaluation of iteration 4, not after the NaN
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    assert not list((tmp_path / "run" / "checkpoints").glob("*partial*"))


def test_skip_nonfinite_skips_the_whole_iteration_and_counts_it(tmp_path, monkeypatch):
    report = tmp_path / "report.json"
    # an infinite loss in the second of two micro-batches of iteration 3
    result = train(tmp_path, monkeypatch, "module.skip_nonfinite=true", "trainer.accumulate_grad_batches=2",
                   "+callbacks.poison.iteration=3", "+callbacks.poison.micro_batches=[1]",
                   "+callbacks.poison.value=inf", f"+callbacks.poison.report={report}",
                   "trainer.max_steps=5", "eval_interval=5")
    assert result.returncode == 0, result.stderr
    assert "iter 3: non-finite loss, update skipped (1 skipped so far)" in result.stdout
    assert json.loads(report.read_text()) == {"params_unchanged": True, "optimizer_steps_unchanged": True}
    assert "iter 5:" in result.stdout
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/skipped_steps")] == [(3, 1.0)]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 5
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_without_skipping_the_flags_are_read_only_every_log_interval_and_before_a_save(tmp_path, monkeypatch):
    """No wait for the device each iteration: the flags are read where the loss is printed (every
    log_every_n_steps iterations) and before a checkpoint is written; the error names the first bad iteration."""
    import pytest

    from helpers import fit_tiny
    from nanogpt_lightning.errors import UserError
    from nanogpt_lightning.train.module import GPTModule

    reads = []
    real_read = GPTModule._first_nonfinite_iteration

    def spy(self):
        reads.append(self.trainer.global_step + 1)
        return real_read(self)

    monkeypatch.setattr(GPTModule, "_first_nonfinite_iteration", spy)
    fit_tiny(tmp_path / "clean", 7, log_every_n_steps=3, val_check_interval=100)
    assert reads == [3, 6, 8]  # iterations 3 and 6, then at the end (after the 7th update)

    reads.clear()
    saves = []

    class SaveAt(L.Callback):  # a checkpoint after iteration 5's update, before the next read
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                saves.append(trainer.global_step)
                trainer.save_checkpoint(tmp_path / "poisoned.ckpt")

    with pytest.raises(UserError, match=r"^non-finite loss at iteration 4; last good checkpoint: none yet "):
        fit_tiny(tmp_path / "nan", 9, PoisonLoss(iteration=4), SaveAt(), log_every_n_steps=3,
                 val_check_interval=100)
    assert reads == [3, 6] and saves == [5]  # before update 3 (fine), then by the save after update 5: stopped
    assert not (tmp_path / "poisoned.ckpt").exists()
