"""More than one process: DDP on CPU (trainer=ddp_cpu), a parallel joblib sweep, an Optuna search.

Each runs scripts/train.py as a user would, on a tiny model.
"""

import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import ITER_LINE, SONNETS, STEP_LINE, TINY_RUN, run_script
from nanogpt_lightning.data.datamodule import TextDataModule
from nanogpt_lightning.devices import auto_precision
from nanogpt_lightning.train import run as training
from nanogpt_lightning.train.settings import compose_train_config


def events_pids(run: Path) -> set[str]:
    """The ids of the processes that wrote the run's TensorBoard events (events.out.tfevents.<t>.<host>.<pid>.<n>)."""
    return {f.name.split(".")[-2] for f in (run / "tensorboard").glob("events.out.tfevents.*")}


def final_val_loss(run: Path) -> float:
    return EventAccumulator(str(run / "tensorboard")).Reload().Scalars("val/loss")[-1].value


def test_each_rank_samples_its_own_batches(tmp_path):
    """The training stream is keyed by global rank: ranks differ, and a rank's stream is reproducible."""
    dm = TextDataModule(data_dir=str(tmp_path / "data"), input_file=str(SONNETS), block_size=16, batch_size=8)
    dm.prepare_data()

    def first_batches(rank):
        dm.trainer = SimpleNamespace(global_rank=rank, global_step=0, accumulate_grad_batches=1)
        loader = iter(dm.train_dataloader())
        return [next(loader)[0] for _ in range(3)]

    rank0, rank1 = first_batches(0), first_batches(1)
    assert all(torch.equal(a, b) for a, b in zip(rank0, first_batches(0)))
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    result = run_script("train.py", *TINY_RUN, "trainer=ddp_cpu", f"data.data_dir={tmp_path / 'data'}",
                        "trainer.max_steps=30", "eval_interval=15", f"hydra.run.dir={tmp_path / 'run'}",
                        cwd=tmp_path)
    return tmp_path, result


def test_ddp_on_cpu_trains_two_processes_and_prints_once(ddp_run):
    _, result = ddp_run
    # 8 x 16 tokens, 2 processes
    assert ", 256 tokens per iteration, cpu x 2 in 32-true, run directory" in result.stdout
    iters = [(int(n), float(loss)) for n, loss, _ in ITER_LINE.findall(result.stdout)]
    assert [n for n, _ in iters] == list(range(1, 31))  # rank zero prints; each line once
    first, last = sum(loss for _, loss in iters[:5]) / 5, sum(loss for _, loss in iters[-5:]) / 5
    assert last < first - 0.3
    steps = STEP_LINE.findall(result.stdout)
    assert [int(s) for s, *_ in steps] == [15, 30]
    assert float(steps[1][2]) < float(steps[0][2])


def test_ddp_on_cpu_writes_one_run_dir_one_log_one_set_of_checkpoints(ddp_run):
    tmp_path, result = ddp_run
    run = tmp_path / "run"
    # the other process ran in the same run directory (Lightning passes it rank 0's) and made none of its own
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["cache", "data", "run"]
    assert list(run.glob("*ddp_process_1*.log"))
    assert [p.name for p in run.rglob("config.yaml")] == ["config.yaml"]
    assert len(events_pids(run)) == 1  # TensorBoard written by one process only
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/iter_loss")] == list(range(1, 31))
    assert [e.step for e in events.Scalars("val/loss")] == [15, 30]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 30


def test_a_local_sweep_of_ddp_runs_is_refused(tmp_path):
    """Lightning would re-run the whole sweep in each child process: one clear line instead."""
    result = run_script("train.py", "-m", *TINY_RUN, "trainer=ddp_cpu", f"data.data_dir={tmp_path / 'data'}",
                        "model.n_embd=16,32", "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                        cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    for job, n_embd in ((0, 16), (1, 32)):  # each job refused in one line, named
        assert re.search(rf"^error: job {job} \(model.n_embd={n_embd}\): a sweep \(-m\) cannot run 2-process DDP runs",
                         result.stderr, re.M)


def test_without_lightnings_private_launcher_class_the_sweep_check_steps_aside(monkeypatch):
    """The check reads a class private to Lightning; if a release renames it, training must still run."""
    strategy = SimpleNamespace(launcher=object(), num_processes=2,
                               cluster_environment=SimpleNamespace(creates_processes_externally=False))
    trainer = SimpleNamespace(strategy=strategy, world_size=2)
    monkeypatch.setattr(training, "_SubprocessScriptLauncher", None)
    training.check_no_script_relaunch_in_sweep(trainer)  # neither a TypeError nor a refusal


def test_joblib_sweep_runs_jobs_in_parallel_processes(tmp_path):
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY_RUN,
               f"data.data_dir={tmp_path / 'data'}", "model.n_embd=16,32", "trainer.max_steps=4",
               "eval_interval=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == ["0", "1"]
    for run, n_embd in zip(runs, (16, 32)):
        checkpoint = torch.load(sweep / run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
        assert checkpoint["global_step"] == 4
        assert checkpoint["nanogpt_lightning"]["model_config"]["n_embd"] == n_embd
    pids = [events_pids(sweep / run) for run in runs]
    assert all(len(p) == 1 for p in pids) and pids[0] != pids[1]  # two worker processes
    # (their lines share one stdout and may interleave there; each job's train.log holds its own)
    assert [len(STEP_LINE.findall((sweep / run / "train.log").read_text())) for run in runs] == [2, 2]


def test_optuna_search_minimises_the_val_loss(tmp_path):
    sweep = tmp_path / "search"
    # a value given on the command line would pin that parameter of the search: leave those to Optuna
    tiny = [o for o in TINY_RUN if not o.startswith(("optimizer.lr=", "model.n_embd="))]
    run_script("train.py", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *tiny,
               f"data.data_dir={tmp_path / 'data'}", "trainer.max_steps=4", "eval_interval=2",
               "scheduler.warmup_iters=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [t.name for t in trials] == ["0", "1"]
    losses = [final_val_loss(t) for t in trials]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(losses), rel=1e-6)
    # the best parameters are those the best trial ran with, drawn from conf/hparams_search/optuna.yaml
    best = trials[losses.index(min(losses))]
    overrides = dict(o.split("=", 1) for o in yaml.safe_load((best / ".hydra" / "overrides.yaml").read_text()))
    assert set(results["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "model.n_embd", "model.dropout"}
    for key, value in results["best_params"].items():
        assert float(overrides[key]) == pytest.approx(value)
    assert 3e-4 <= results["best_params"]["optimizer.lr"] <= 3e-3



def test_gpt2_124m_recipe_is_nanogpts_train_gpt2():
    cfg = compose_train_config(["experiment=gpt2_124m"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.dropout) == (12, 12, 768, 0.0)
    assert (cfg.data.block_size, cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (1024, 12, 5)
    # 12 sequences x 1024 tokens x 5 micro-batches x 8 GPUs: nanoGPT's ~0.5M tokens an iteration
    assert cfg.data.block_size * cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * 8 == 491_520
    assert (cfg.trainer.max_steps, cfg.scheduler.lr_decay_iters, cfg.scheduler.warmup_iters) == (600_000, 600_000, 2000)
    assert (cfg.optimizer.lr, cfg.scheduler.min_lr) == (6e-4, 6e-5)
    assert (cfg.eval_interval, cfg.eval_iters, cfg.model.compile, cfg.trainer.precision) == (1000, 200, True, "auto")
    assert (cfg.data.dataset, cfg.data.val_fraction) == ("Skylion007/openwebtext", 0.0005)


def test_shakespeare_char_recipe_is_nanogpts_train_shakespeare_char():
    cfg = compose_train_config(["experiment=shakespeare_char"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.dropout, cfg.model.bias) == (
        6, 6, 384, 0.2, False)
    assert (cfg.data.block_size, cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (256, 64, 1)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, list(cfg.optimizer.betas)) == (1e-3, 0.1, [0.9, 0.99])
    assert (cfg.trainer.max_steps, cfg.scheduler.lr_decay_iters, cfg.scheduler.warmup_iters, cfg.scheduler.min_lr) == (
        5000, 5000, 100, 1e-4)
    assert (cfg.eval_interval, cfg.eval_iters, cfg.log_interval, cfg.data.tokenizer) == (250, 200, 10, "char")


class WhatRan(L.Callback):
    """Each iteration's micro-batches, and its gradient norm before clipping (on_before_optimizer_step comes
    before it) and after (the gradients the update used, still there when its last micro-batch ends)."""

    micro_batches: list[int] = []
    norms: list[tuple[float, float]] = []

    def on_train_start(self, trainer, pl_module):
        WhatRan.micro_batches, WhatRan.norms, self._count, self._unclipped = [], [], 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._count += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        WhatRan.micro_batches.append(self._count)
        self._count, self._unclipped = 0, grad_norm(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._unclipped is not None:
            WhatRan.norms.append((self._unclipped, grad_norm(pl_module)))
            self._unclipped = None


def grad_norm(module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()
                                                       if p.grad is not None])))


def test_gpt2_124m_recipe_trains_three_iterations_at_a_reduced_size_with_its_own_settings(tmp_path):
    """experiment=gpt2_124m with its sizes reduced and compile off (overrides only) on a GPT-2 BPE text: the
    recipe's other settings are what trained."""
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg
    cfg = compose_train_config(["experiment=gpt2_124m", "data=text", f"data.input_file={SONNETS}",
                                "data.tokenizer=gpt2", f"data.data_dir={tmp_path / 'data'}", "data.block_size=16",
                                "data.batch_size=2", "model.n_layer=2", "model.n_head=4", "model.n_embd=128",
                                "model.compile=false", "trainer.max_steps=3", "eval_iters=1",
                                "trainer.accelerator=cpu", "callbacks.progress_bar.refresh_rate=0",
                                "+callbacks.what_ran._target_=test_scaling.WhatRan"], output_dir=str(tmp_path / "run"))
    try:
        training.train(cfg)
    finally:
        HydraConfig.instance().cfg = before
    assert WhatRan.micro_batches == [5, 5, 5]  # accumulation
    assert len(WhatRan.norms) == 3  # clipped to norm 1.0 (this size's gradients are larger at the start)
    assert all(unclipped > 1.5 and clipped == pytest.approx(1.0, rel=1e-4) for unclipped, clipped in WhatRan.norms)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 3
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [(g["betas"], g["weight_decay"], g["fused"]) for g in groups] == [((0.9, 0.95), 0.1, True),
                                                                             ((0.9, 0.95), 0.0, True)]
    assert [g["lr"] for g in groups] == pytest.approx([6e-4 * 4 / 2001] * 2)  # warmup's 4th of 2001 (nanoGPT's)
    assert checkpoint["state_dict"]["model.transformer.wte.weight"].shape == (50304, 128)  # 50257 padded to 64s
    settings = checkpoint["nanogpt_lightning"]["settings"]
    assert settings["trainer.precision"] == auto_precision(torch.device("cpu"))
    assert (settings["scheduler.min_lr"], settings["scheduler.lr_decay_iters"], settings["model.dropout"],
            settings["model.bias"], settings["data.tokenizer"]) == (6e-5, 600_000, 0.0, False, "gpt2")
