import math

import pytest
import torch

from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.train.checkpoints import CHECKPOINT_KEY
from nanogpt_lightning.train.module import GPTModule
from nanogpt_lightning.train.optimizers import adamw
from nanogpt_lightning.train.schedules import WarmupCosineLR


def schedule(**kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = WarmupCosineLR(optimizer, **kwargs)
    lrs = []
    for _ in range(30):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_to_min_lr():
    lrs = schedule(warmup_iters=4, lr_decay_iters=24, min_lr=1e-4)
    assert lrs[0] == pytest.approx(1e-3 * 1 / 5)
    assert lrs[3] == pytest.approx(1e-3 * 4 / 5)
    assert lrs[4] == pytest.approx(1e-3)
    assert lrs[14] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # halfway through the decay
    assert lrs[24] == pytest.approx(1e-4)
    assert lrs[29] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_cooldown_holds_the_peak_then_decays_over_its_fraction(decay):
    """warmup 4, decay span 4..24, cooldown 0.5: the peak until 14, then down to min_lr at 24."""
    lrs = schedule(warmup_iters=4, lr_decay_iters=24, min_lr=1e-4, cooldown=0.5, decay=decay)
    assert lrs[3] == pytest.approx(1e-3 * 4 / 5)
    assert lrs[4:15] == pytest.approx([1e-3] * 11)
    for it in (16, 19, 22):
        ratio = (it - 14) / 10
        left = 1 - ratio if decay == "linear" else 0.5 * (1 + math.cos(math.pi * ratio))
        assert lrs[it] == pytest.approx(1e-4 + left * (1e-3 - 1e-4))
    assert lrs[24] == pytest.approx(1e-4) and lrs[29] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_constant_lr_when_decay_is_off():
    assert set(schedule(warmup_iters=4, lr_decay_iters=24, min_lr=1e-4, decay_lr=False)) == {1e-3}


def test_module_builds_adamw_groups_and_saves_what_sampling_needs():
    config = GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=8)
    tokenizer = {"kind": "char", "chars": "abcdefghij", "vocab_size": 10}
    module = GPTModule(
        config, tokenizer,
        optimizer=lambda model: adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95)),
        scheduler=lambda opt: WarmupCosineLR(opt, warmup_iters=2, lr_decay_iters=10, min_lr=1e-4))
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert optimizers["lr_scheduler"]["interval"] == "step"
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint[CHECKPOINT_KEY]["tokenizer"] == tokenizer
    assert GPTConfig(**checkpoint[CHECKPOINT_KEY]["model_config"]) == config
    assert math.isfinite(module.training_step((torch.zeros(2, 8, dtype=torch.long),) * 2, 0).item())
