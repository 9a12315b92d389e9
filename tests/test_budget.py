"""Time budgets (`budget_s`): training stops after N seconds of training, evaluates, and ends its LR schedule."""

import time

import lightning as L
import pytest
import torch

from helpers import fit_tiny
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.train.callbacks import TimeBudget
from nanogpt_lightning.train.run import resume_path

BUDGET_S = 3.0  # long enough for more than 100 iterations (an evaluation at 100) on a busy 2-core machine
EVAL_SLEEP_S = 0.3


class Record(L.Callback):
    """The budget's seconds after each iteration, the steps evaluated at, and the learning rate used."""

    def __init__(self, budget: TimeBudget):
        self.budget = budget
        self.seconds, self.evaluated_at, self.lrs = [], [], []

    def on_train_batch_start(self, trainer, *args):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, *args):
        self.seconds.append(self.budget.seconds_used())

    def on_validation_end(self, trainer, *args):
        self.evaluated_at.append(trainer.global_step)
        time.sleep(EVAL_SLEEP_S)  # a slow evaluation: its time is not training time


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("budget") / "run"
    budget = TimeBudget(BUDGET_S)
    record = Record(budget)
    start = time.perf_counter()
    trainer = fit_tiny(run, -1, budget, record, val_check_interval=100)
    record.wall_s = time.perf_counter() - start
    trainer.save_checkpoint(run / "last.ckpt")
    return trainer, budget, record, run / "last.ckpt"


def test_a_budget_run_stops_within_one_iteration_of_the_budget_and_evaluates_there(budget_run):
    trainer, budget, record, _ = budget_run
    *before, last = record.seconds
    assert before[-1] < BUDGET_S <= last  # the iteration that crossed the budget was the last
    assert trainer.global_step == len(record.seconds) > 100
    assert record.evaluated_at[-1] == trainer.global_step  # a final evaluation, as at a normal end
    assert record.evaluated_at[:-1] == list(range(100, trainer.global_step, 100))
    assert record.wall_s > BUDGET_S + len(record.evaluated_at) * EVAL_SLEEP_S  # evaluations did not count


def test_the_schedule_runs_on_the_budget_and_ends_at_min_lr(budget_run):
    trainer, _, record, _ = budget_run
    lrs = record.lrs
    assert max(lrs) == pytest.approx(1e-3, rel=0.05)  # the warmup (1 of 10 schedule units) reached the peak
    # decaying on time: the iterations that started after a fifth of the budget (warmup is its first tenth),
    # chosen by the clock, not by their count (a busy machine makes iteration times uneven)
    started_at = [0.0, *record.seconds[:-1]]
    decaying = [lr for lr, t in zip(lrs, started_at, strict=True) if t >= BUDGET_S / 5]
    assert len(decaying) > 50 and all(a >= b for a, b in zip(decaying, decaying[1:]))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)  # min_lr when the budget ends


def test_checkpoints_keep_the_seconds_used_and_a_spent_budget_is_not_resumed(budget_run):
    trainer, budget, _, checkpoint = budget_run
    saved = torch.load(checkpoint, weights_only=False)
    assert TimeBudget.seconds_trained(saved) == pytest.approx(budget.seconds_used(), abs=1e-6)
    assert TimeBudget.seconds_trained(saved) >= BUDGET_S
    assert "_fraction_used" not in saved["lr_schedulers"][0]  # the clock is the run's, not the checkpoint's

    resumed = TimeBudget(BUDGET_S + 10)
    resumed.load_state_dict(saved["callbacks"]["TimeBudget"])
    assert resumed.fraction_used() == pytest.approx(TimeBudget.seconds_trained(saved) / (BUDGET_S + 10))

    module = trainer.lightning_module
    complete = rf"already complete: it trained \d+\.\ds of budget_s={BUDGET_S:g}; pass a larger budget_s"
    with pytest.raises(UserError, match=complete):
        resume_path(str(checkpoint), module, max_steps=10**9, budget_s=BUDGET_S, allow_other_data=False,
                    may_change=("budget_s",))
    assert resume_path(str(checkpoint), module, max_steps=1, budget_s=BUDGET_S + 10, allow_other_data=False,
                       may_change=("budget_s",)) == checkpoint
