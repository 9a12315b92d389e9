import math

import torch

from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.train.checkpoints import CHECKPOINT_KEY
from nanogpt_lightning.train.module import GPTModule
from nanogpt_lightning.train.optimizers import adamw
from nanogpt_lightning.train.schedules import WarmupCosineLR


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
