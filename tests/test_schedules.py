"""WarmupCosineLR: nanoGPT's warmup and cosine decay, warmup-stable-decay, a time budget's clock, its refusals."""

import math

import pytest
import torch

from nanogpt_lightning.train.schedules import WarmupCosineLR

PEAK = 1e-3


def optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)


def schedule(iters=30, **kwargs):
    """The learning rate of each of the first `iters` iterations."""
    opt = optimizer()
    scheduler = WarmupCosineLR(opt, **kwargs)
    lrs = []
    for _ in range(iters):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_to_min_lr():
    lrs = schedule(warmup_iters=4, lr_decay_iters=24, min_lr=1e-4)
    assert lrs[:5] == pytest.approx([PEAK * (it + 1) / 5 for it in range(5)])  # the 5th is the peak
    for it in (9, 14, 20):
        ratio = (it - 4) / 20
        assert lrs[it] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (PEAK - 1e-4))
    assert lrs[24:] == pytest.approx([1e-4] * 6)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_cooldown_holds_the_peak_then_decays_over_its_fraction(decay):
    """warmup 4, decay span 4..24, cooldown 0.5: the peak until 14, then down to min_lr at 24."""
    lrs = schedule(warmup_iters=4, lr_decay_iters=24, min_lr=1e-4, cooldown=0.5, decay=decay)
    assert lrs[3] == pytest.approx(PEAK * 4 / 5)
    assert lrs[4:15] == pytest.approx([PEAK] * 11)
    for it in (16, 19, 22):
        ratio = (it - 14) / 10
        left = 1 - ratio if decay == "linear" else 0.5 * (1 + math.cos(math.pi * ratio))
        assert lrs[it] == pytest.approx(1e-4 + left * (PEAK - 1e-4))
    assert lrs[24] == pytest.approx(1e-4) and lrs[29] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_constant_lr_when_decay_is_off_even_with_a_warmup_past_the_decay():
    assert set(schedule(warmup_iters=40, lr_decay_iters=24, min_lr=1e-4, decay_lr=False)) == {PEAK}


def test_under_a_budget_the_position_is_the_fraction_of_time_used():
    """follow(): the iteration count no longer matters, the clock does (TimeBudget calls it)."""
    opt = optimizer()
    scheduler = WarmupCosineLR(opt, warmup_iters=4, lr_decay_iters=24, min_lr=1e-4)
    used = [0.0]
    scheduler.follow(lambda: used[0])
    for fraction, it in ((0.0, 0), (0.1, 2.4), (0.5, 12), (0.75, 18), (1.0, 24)):
        used[0] = fraction
        scheduler.step()  # any number of iterations: only the fraction counts
        scheduler.step()
        if it < 4:
            expected = PEAK * (it + 1) / 5
        else:
            expected = 1e-4 + 0.5 * (1 + math.cos(math.pi * (it - 4) / 20)) * (PEAK - 1e-4)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected), fraction


def test_the_budget_clock_is_not_saved_and_a_restored_schedule_continues():
    opt = optimizer()
    scheduler = WarmupCosineLR(opt, warmup_iters=4, lr_decay_iters=24, min_lr=1e-4)
    scheduler.follow(lambda: 0.5)
    for _ in range(7):
        scheduler.step()
    state = scheduler.state_dict()
    assert "_fraction_used" not in state and state["last_epoch"] == 7
    opt2 = optimizer()
    restored = WarmupCosineLR(opt2, warmup_iters=4, lr_decay_iters=24, min_lr=1e-4)
    restored.load_state_dict(state)
    restored.step()  # on iterations again: the 8th
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 4 / 20)) * (PEAK - 1e-4))


@pytest.mark.parametrize("kwargs, message", [
    ({"warmup_iters": 24}, "scheduler.warmup_iters must be below scheduler.lr_decay_iters (24), got 24"),
    ({"cooldown": 0.0}, "scheduler.cooldown must be in (0, 1], got 0.0"),
    ({"cooldown": 1.5}, "scheduler.cooldown must be in (0, 1], got 1.5"),
    ({"decay": "exp"}, "scheduler.decay must be cosine or linear, got 'exp'"),
])
def test_a_schedule_that_cannot_run_is_refused_naming_the_setting(kwargs, message):
    with pytest.raises(ValueError) as err:
        WarmupCosineLR(optimizer(), **{"warmup_iters": 4, "lr_decay_iters": 24, "min_lr": 1e-4, **kwargs})
    assert str(err.value).startswith(message)


def test_a_full_cooldown_is_the_plain_cosine():
    plain = schedule(warmup_iters=4, lr_decay_iters=24, min_lr=1e-4)
    assert schedule(warmup_iters=4, lr_decay_iters=24, min_lr=1e-4, cooldown=1.0, decay="cosine") == plain
