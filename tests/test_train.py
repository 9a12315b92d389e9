"""End to end: scripts/train.py on a small real text, as a user runs it."""

import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_RUN, run_script

ITER_LINE = re.compile(r"^iter (\d+): loss (\d+\.\d{4}), time (\d+\.\d{2})ms$", re.M)
STEP_LINE = re.compile(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})$", re.M)


def train(tmp_path, run_name, *overrides):
    return run_script("train.py", *TINY_RUN, f"data.data_dir={tmp_path / 'data'}",
                      f"hydra.run.dir={tmp_path / run_name}", *overrides, cwd=tmp_path)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("train")
    result = train(tmp_path, "run", "trainer.max_steps=60", "eval_interval=30", "trainer.accumulate_grad_batches=2")
    return tmp_path, result


def test_training_lowers_the_loss_and_prints_nanogpt_lines(first_run):
    _, result = first_run
    iters = [(int(n), float(loss)) for n, loss, _ in ITER_LINE.findall(result.stdout)]
    assert [n for n, _ in iters] == list(range(1, 61))
    first, last = sum(l for _, l in iters[:5]) / 5, sum(l for _, l in iters[-5:]) / 5
    assert last < first - 0.5
    steps = STEP_LINE.findall(result.stdout)
    assert [int(s) for s, _, _ in steps] == [30, 60]
    assert float(steps[1][2]) < float(steps[0][2])


def test_run_dir_holds_config_tensorboard_curves_and_checkpoints(first_run):
    tmp_path, result = first_run
    run = tmp_path / "run"
    assert (run / ".hydra" / "config.yaml").exists()
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/iter_loss", "train/loss", "val/loss", "perf/ms_per_iter", "perf/tokens_per_sec", "lr"):
        assert tag in tags
    iter_losses = events.Scalars("train/iter_loss")
    assert [e.step for e in iter_losses] == list(range(1, 61))
    printed = [float(loss) for _, loss, _ in ITER_LINE.findall(result.stdout)]
    assert [round(e.value, 4) for e in iter_losses] == pytest.approx(printed, abs=1e-4)
    assert [e.step for e in events.Scalars("val/loss")] == [30, 60]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 60
    assert checkpoint["nanogpt_lightning"]["model_config"]["n_embd"] == 32
    assert checkpoint["nanogpt_lightning"]["tokenizer"]["kind"] == "char"
    assert (run / "checkpoints" / "best.ckpt").exists()


def test_resume_continues_the_step_count(first_run):
    tmp_path, _ = first_run
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    result = train(tmp_path, "resumed", "trainer.max_steps=70", "eval_interval=30",
                   "trainer.accumulate_grad_batches=2", f"ckpt_path={ckpt}")
    assert [int(n) for n, _, _ in ITER_LINE.findall(result.stdout)] == list(range(61, 71))
    first_loss = float(ITER_LINE.findall(result.stdout)[0][1])
    assert first_loss < 3.0  # the trained weights came back, not a fresh model (ln 38 = 3.6)


def test_bpe_training_runs(tmp_path):
    result = run_script("train.py", *TINY_RUN, "data.tokenizer=gpt2", f"data.data_dir={tmp_path / 'bpe'}",
                        "trainer.max_steps=4", "eval_interval=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert [int(n) for n, _, _ in ITER_LINE.findall(result.stdout)] == [1, 2, 3, 4]


def test_two_run_sweep_writes_one_directory_per_run(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script("train.py", "-m", *TINY_RUN, f"data.data_dir={tmp_path / 'data'}",
                        "model.n_embd=16,32", "trainer.max_steps=4", "eval_interval=2",
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["0", "1"]
    for run in runs:
        assert list((sweep / run / "tensorboard").glob("events.out.tfevents.*"))
        assert (sweep / run / "checkpoints" / "last.ckpt").exists()
    assert len(STEP_LINE.findall(result.stdout)) == 4
