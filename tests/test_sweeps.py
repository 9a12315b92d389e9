"""Sweeps that go wrong, through the real scripts/train.py: a failed job, a failed Optuna trial, Ctrl+C.

Every job of a sweep runs; each failure is reported when it happens and again in a summary at the end,
and the sweep exits non-zero. Ctrl+C stops the job in hand (saved, as for a single run) and the sweep.
"""

import math
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import ROOT, TINY_RUN, run_script

# the TINY_RUN settings less the ones each test sweeps over
TINY = [o for o in TINY_RUN if not o.startswith(("model.n_head=", "optimizer.lr="))]
N_HEAD_ERROR = "model.n_embd (32) must be divisible by model.n_head (3)"


def steps_saved(run) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["global_step"]


def test_a_failed_job_is_reported_and_the_other_jobs_run(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script("train.py", "-m", *TINY, "optimizer.lr=3e-3", f"data.data_dir={tmp_path / 'data'}",
                        "model.n_head=2,3,4", "trainer.max_steps=4", "eval_interval=2",
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr
    assert steps_saved(sweep / "0") == 4 and steps_saved(sweep / "2") == 4  # the job after the failed one ran
    assert not (sweep / "1" / "checkpoints").exists()
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    # reported when it failed, and in the summary that ends the sweep
    reported = [line for line in lines if line.startswith(f"error: job 1 (model.n_head=3): {N_HEAD_ERROR}")]
    assert len(reported) == 1
    summary = [f"error: 1 of 3 jobs of the sweep {sweep} failed:", "  " + reported[0].removeprefix("error: ")]
    assert lines[-2:] == summary
    assert re.search(rf"run directory {sweep}/2\b", result.stdout)
    for job in ("0", "2"):  # one directory per job, side by side in TensorBoard, each with its own log
        assert list((sweep / job / "tensorboard").glob("events.out.tfevents.*"))
        assert len(re.findall(r"^step \d+: ", (sweep / job / "train.log").read_text(), re.M)) == 2
    assert "model.n_head (3)" in (sweep / "1" / "train.log").read_text()  # the failed job's record


BUG = """
import lightning as L

class Bug(L.Callback):
    def __init__(self, fail: bool):
        self.fail = fail

    def on_train_start(self, trainer, pl_module):
        if self.fail:
            raise RuntimeError("a bug in on_train_start")
"""


def test_an_unexpected_exception_keeps_its_traceback_and_fails_the_sweep(tmp_path, monkeypatch):
    """A bug is no user mistake: the traceback stays for the report, and the other jobs still run."""
    (tmp_path / "bug.py").write_text(BUG)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sweep = tmp_path / "sweep"
    result = run_script("train.py", "-m", *TINY, "optimizer.lr=3e-3", "model.n_head=2", "trainer.max_steps=2",
                        f"data.data_dir={tmp_path / 'data'}", "+callbacks.bug._target_=bug.Bug",
                        "+callbacks.bug.fail=true,false", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr
    assert steps_saved(sweep / "1") == 2
    assert "Traceback (most recent call last)" in result.stderr and 'raise RuntimeError("a bug' in result.stderr
    line = "job 0 (+callbacks.bug.fail=True): RuntimeError: a bug in on_train_start"
    assert f"error: {line}" in result.stderr.splitlines()
    assert result.stderr.splitlines()[-2:] == [f"error: 1 of 2 jobs of the sweep {sweep} failed:", f"  {line}"]


def test_optuna_marks_an_invalid_trial_failed_and_finishes_the_search(tmp_path):
    sweep = tmp_path / "search"
    # n_embd is fixed at 32, so n_head=3 is an invalid trial; seed 3 draws both kinds in three trials
    result = run_script("train.py", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "seed=3", *TINY,
                        "model.n_head=choice(2,3)", f"data.data_dir={tmp_path / 'data'}", "trainer.max_steps=4",
                        "eval_interval=2", "scheduler.warmup_iters=1", f"hydra.sweep.dir={sweep}",
                        cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr
    heads = {}
    for trial in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text()))
        heads[int(trial.name)] = int(overrides["model.n_head"])
    assert sorted(heads) == [0, 1, 2] and set(heads.values()) == {2, 3}
    failed = [n for n, h in heads.items() if h == 3]
    valid = [n for n, h in heads.items() if h == 2]
    losses = {n: EventAccumulator(str(sweep / str(n) / "tensorboard")).Reload().Scalars("val/loss")[-1].value
              for n in valid}
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"]["model.n_head"] == 2
    assert results["best_value"] == pytest.approx(min(losses.values()), rel=1e-6)
    for n in failed:
        assert re.search(rf"^error: job {n} \(.*model\.n_head=3.*\): {re.escape(N_HEAD_ERROR)}", result.stderr, re.M)
    assert result.stderr.splitlines()[-len(failed) - 1] == (
        f"error: {len(failed)} of 3 jobs of the sweep {sweep} failed:")
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_the_job_in_hand_and_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-u", str(ROOT / "scripts" / "train.py"), "-m", *TINY, "model.n_head=2",
               f"data.data_dir={tmp_path / 'data'}", "optimizer.lr=1e-3,2e-3,3e-3", "trainer.max_steps=200",
               f"hydra.sweep.dir={sweep}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # job 0 is training
        if line.startswith("iter 3:"):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    checkpoint = sweep / "0" / "checkpoints" / "last.ckpt"
    stopped_at = steps_saved(sweep / "0")
    assert 3 <= stopped_at < 200
    assert f"ckpt_path={checkpoint}" in out  # train()'s resume line for the stopped job
    assert not any((sweep / job / "checkpoints").exists() for job in ("1", "2"))
    assert err.splitlines()[-2:] == [
        f"error: SIGINT stopped the sweep {sweep} in job 0 (optimizer.lr=0.001) at iteration {stopped_at}; "
        "resume that job with the resume: line above",
        "  not run: job 1 (optimizer.lr=0.002), job 2 (optimizer.lr=0.003)"]


def test_ctrl_c_before_training_began_is_one_line(tmp_path):
    """During the imports, seconds before Hydra or training start."""
    # a test worker may ignore SIGINT, and a child would inherit that: Python then raises no KeyboardInterrupt
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *TINY_RUN,
                                f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip() == "stopped by Ctrl+C before training began; nothing saved"
    assert not (tmp_path / "run").exists()


NAN_LOSS = """
import lightning as L
import torch

class NaNLoss(L.Callback):
    def __init__(self, poison: bool):
        self.poison = poison

    def on_train_end(self, trainer, pl_module):
        if self.poison:  # as a diverged run ends
            trainer.callback_metrics["val/loss"] = torch.tensor(float("nan"))
"""


def test_optuna_marks_a_trial_ending_in_nan_failed_and_finishes_the_search(tmp_path, monkeypatch):
    """Optuna is never told NaN (it would refuse it and end the search): the trial is a failed one."""
    (tmp_path / "nanloss.py").write_text(NAN_LOSS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sweep = tmp_path / "search"
    result = run_script("train.py", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "seed=3", *TINY,
                        "model.n_head=2", "+callbacks.nan._target_=nanloss.NaNLoss",
                        "+callbacks.nan.poison=choice(true,false)",
                        f"data.data_dir={tmp_path / 'data'}", "trainer.max_steps=3", "eval_interval=2",
                        "scheduler.warmup_iters=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr
    poisoned = {}
    for trial in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text()))
        poisoned[int(trial.name)] = overrides["+callbacks.nan.poison"].lower() == "true"
    assert sorted(poisoned) == [0, 1, 2] and set(poisoned.values()) == {True, False}  # all three trials ran
    failed = [n for n, p in poisoned.items() if p]
    for n in failed:
        assert re.search(rf"^error: job {n} \(.*\): its final val loss is nan, nothing to compare$", result.stderr,
                         re.M)
    summary = f"error: {len(failed)} of 3 jobs of the sweep {sweep} failed:"
    assert result.stderr.splitlines()[-len(failed) - 1] == summary
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"]["+callbacks.nan.poison"] is False and math.isfinite(results["best_value"])
    assert "Traceback" not in result.stderr
