"""How a run ends: evaluated and saved at its last iteration whatever eval_interval is, then what to do next
(its checkpoints, final val loss and bpb, and the sample/eval/tensorboard commands); a resumed run says where it
resumed from; a run that saves nothing says so; `make sample` and `make tensorboard` use the project's venv."""

import shlex
import subprocess

import pytest
import torch

from helpers import ITER_LINE, ROOT, STEP_LINE, TINY_RUN, run_script


def train(tmp_path, run_name, *overrides, check=True):
    return run_script("train.py", *TINY_RUN, f"data.data_dir={tmp_path / 'data'}",
                      f"hydra.run.dir={tmp_path / run_name}", *overrides, cwd=tmp_path, check=check)


def step_of(path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """7 iterations, evaluated every 5: the last one is no multiple of the interval."""
    tmp_path = tmp_path_factory.mktemp("finish")
    return tmp_path, train(tmp_path, "run", "trainer.max_steps=7", "eval_interval=5")


def test_the_last_iteration_is_evaluated_and_saved_whatever_the_interval(short_run):
    tmp_path, result = short_run
    assert [int(n) for n, *_ in ITER_LINE.findall(result.stdout)] == list(range(1, 8))
    assert [int(s) for s, *_ in STEP_LINE.findall(result.stdout)] == [5, 7]  # 7: the end, not the interval
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert step_of(checkpoints / "last.ckpt") == 7 and step_of(checkpoints / "best.ckpt") == 7  # the loss fell


def test_a_finished_run_says_where_its_checkpoints_are_and_what_to_run_next(short_run):
    tmp_path, result = short_run
    run = tmp_path / "run"
    _, val_loss, val_bpb = STEP_LINE.findall(result.stdout)[-1][1:]
    best = shlex.quote(str(run / "checkpoints" / "best.ckpt"))
    last = result.stdout.splitlines()[-7:]
    assert STEP_LINE.fullmatch(last[0])  # the last `step` line, then:
    assert last[1:] == [
        "",
        f"finished at iteration 7: val loss {val_loss}, val bpb {val_bpb}",
        f"checkpoints: best.ckpt, last.ckpt in {run / 'checkpoints'}",
        f"sample: python scripts/sample.py ckpt={best}",
        f"evaluate: python scripts/eval.py ckpt={best}",
        f"curves: tensorboard --logdir {run / 'tensorboard'}",
    ]
    assert "finished at iteration 7" in (run / "train.log").read_text()  # recorded in the run's log too
    assert result.stderr.strip() == ""


def test_a_run_resumed_into_another_directory_says_where_it_resumed_from(short_run):
    tmp_path, _ = short_run
    result = train(tmp_path, "resumed", "trainer.max_steps=9", "eval_interval=5", f"ckpt_path={tmp_path / 'run'}")
    lines = result.stdout.splitlines()
    assert f"resumed from iteration 7 of {tmp_path / 'run'}" in lines
    assert lines.index(f"resumed from iteration 7 of {tmp_path / 'run'}") < min(
        i for i, line in enumerate(lines) if ITER_LINE.match(line))
    assert [int(n) for n, *_ in ITER_LINE.findall(result.stdout)] == [8, 9]
    assert "dirpath has changed" not in result.stderr  # Lightning's warning: the line above says it
    assert step_of(tmp_path / "resumed" / "checkpoints" / "last.ckpt") == 9


def test_a_run_keeping_only_best_ckpt_still_saves_one_when_shortened(tmp_path):
    """finetune_shakespeare's way (nanoGPT's always_save_checkpoint=False), 2 iterations of an interval of 5."""
    result = train(tmp_path, "run", "callbacks.last_checkpoint=null", "trainer.max_steps=2", "eval_interval=5")
    assert [int(s) for s, *_ in STEP_LINE.findall(result.stdout)] == [2]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt"] and step_of(checkpoints / "best.ckpt") == 2
    assert f"checkpoints: best.ckpt in {checkpoints}" in result.stdout.splitlines()


def test_a_run_that_saves_nothing_warns_in_one_line(tmp_path):
    result = train(tmp_path, "run", "callbacks.last_checkpoint=null", "callbacks.model_checkpoint=null",
                   "+trainer.enable_checkpointing=false", "trainer.max_steps=2", "eval_interval=5")
    assert result.stderr.strip().splitlines() == [
        "warning: this run saves no checkpoint (callbacks.model_checkpoint and callbacks.last_checkpoint are null, "
        "trainer.enable_checkpointing is false)"]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert "warning: this run saved no checkpoint" in result.stdout.splitlines()


@pytest.mark.parametrize("target, command", [("sample", "scripts/sample.py ckpt=latest"),
                                             ("tensorboard", "-m tensorboard.main --logdir outputs")])
def test_make_sample_and_tensorboard_run_in_the_venv(target, command):
    planned = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, check=True)
    lines = [line.strip() for line in planned.stdout.splitlines() if not line.startswith("make")]
    assert f".venv/bin/python {command}" in lines
