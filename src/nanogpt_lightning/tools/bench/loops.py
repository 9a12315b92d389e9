"""The timed loops, each ticking its participant's Clock once per iteration: nanoGPT's plain PyTorch loop,
the Lightning loop of scripts/train.py, and the matmul bursts that give the machine's peaks."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from nanogpt_lightning.devices import autocast_for
from nanogpt_lightning.model.fused_loss import matmul
from nanogpt_lightning.tools.bench.measure import MATMULS_PER_TURN, matmul_size
from nanogpt_lightning.tools.bench.turns import Clock
from nanogpt_lightning.train.callbacks import IterationCallback
from nanogpt_lightning.train.run import build_datamodule, build_module, build_trainer


def plain_pytorch_loop(cfg: DictConfig, device: torch.device, iterations: int, clock: Clock,
                       compiled: bool = False) -> None:
    """nanoGPT's train.py loop, on the project's GPT with `F.cross_entropy` on the full logits; in a low
    precision under autocast, with a gradient scaler for float16 (nanoGPT's `ctx` and `scaler`); `compiled`:
    on torch.compile(model), as nanoGPT's `compile=True`."""
    datamodule = build_datamodule(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    model = build_module(cfg, datamodule, device).model.to(device)
    block_size, batch_size = datamodule.block_size, datamodule.batch_size
    accumulation = cfg.trainer.accumulate_grad_batches
    # nanoGPT uses the fused AdamW on cuda only
    optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.optimizer.weight_decay), lr=cfg.optimizer.lr,
                                  betas=tuple(cfg.optimizer.betas), fused=device.type == "cuda")
    scheduler = instantiate(cfg.scheduler)(optimizer)  # sets the learning rate of each iteration
    if compiled:  # after the optimizer is built on its parameters, as nanoGPT does
        model = torch.compile(model)
    autocast = autocast_for(str(cfg.trainer.precision), device)
    scaler = torch.amp.GradScaler(device.type, enabled=str(cfg.trainer.precision) == "16-mixed")

    def get_batch():
        # nanoGPT recreates the memmap every batch to avoid a memory leak
        data = np.memmap(datamodule.prepared_dir / "train.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    clock.start()
    clock.begin_iterations()
    x, y = get_batch()
    for iteration in range(iterations):
        for _ in range(accumulation):
            with autocast:
                _, loss = model(x, y)
            loss = loss / accumulation
            x, y = get_batch()
            scaler.scale(loss).backward()
        if cfg.trainer.gradient_clip_val:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if iteration % cfg.log_interval == 0:  # nanoGPT's log line (its output goes to os.devnull here)
            print(f"plain iter {iteration}: loss {loss.item() * accumulation:.4f}", flush=True)
        clock.tick()


class ClockCallback(IterationCallback):
    """Ticks the clock at each optimizer step; an iteration that ran an evaluation is left out."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.clock.begin_iterations()

    def on_validation_start(self, trainer, pl_module):
        self.clock.discard_current()

    def on_iteration_end(self, trainer, pl_module):
        self.clock.tick()


def lightning_loop(cfg: DictConfig, device: torch.device, clock: Clock) -> None:
    """The Trainer train.py builds from the config (its callbacks and logger), plus the bench's clock."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule, device)
    trainer = build_trainer(cfg, extra_callbacks=(ClockCallback(clock),))
    clock.start()
    trainer.fit(module, datamodule=datamodule)


def matmul_bursts(device: torch.device, low_dtypes: list[torch.dtype], turns: int, clock: Clock) -> None:
    """Square matmuls, bursts in turn: fp32 through torch.mm's library (MKL on x86 CPUs), fp32 through the
    fused loss's (oneDNN there, see fused_loss.matmul), then torch.mm in each low precision; each kind's best
    burst is the machine's peak for it (report.py)."""
    n = matmul_size(device)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    bursts = [(torch.mm, a, b), (matmul, a, b)] + [(torch.mm, a.to(dtype), b.to(dtype)) for dtype in low_dtypes]
    clock.start()
    clock.begin_iterations()
    for _ in range(turns):
        for product, left, right in bursts:
            for _ in range(MATMULS_PER_TURN):
                product(left, right)
            clock.tick()
