"""Ctrl+C, exact resume and atomic checkpoints, through the real scripts."""

import os
import signal
import subprocess
import sys
import time

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nanogpt_lightning.callbacks import GracefulInterrupt

from conftest import ROOT, TINY_RUN, run_script

# dropout on, so the resumed run must also restore torch's random generator
RUN = [*TINY_RUN, "model.dropout=0.1", "trainer.accumulate_grad_batches=2", "trainer.max_steps=14",
       "eval_interval=5", "log_interval=1"]


def start_training(tmp_path, run_name):
    command = [sys.executable, "-u", str(ROOT / "scripts" / "train.py"), *RUN,
               f"data.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / run_name}"]
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process, prefix):
    for line in process.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"no line starting {prefix!r}; stderr:\n{process.stderr.read()}")


def iteration_losses(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return {e.step: e.value for e in events.Scalars("train/iter_loss")}


def test_ctrl_c_saves_and_the_resumed_run_repeats_the_unbroken_one_exactly(tmp_path):
    run_script("train.py", *RUN, f"data.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'whole'}",
               cwd=tmp_path)
    whole = iteration_losses(tmp_path / "whole")
    assert sorted(whole) == list(range(1, 15))

    process = start_training(tmp_path, "broken")
    wait_for_line(process, "iter 3:")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    checkpoint = tmp_path / "broken" / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(checkpoint, weights_only=False, map_location="cpu")["global_step"]
    assert 3 <= stopped_at < 14
    assert f"stopped at iteration {stopped_at}; checkpoint saved: {checkpoint}" in out
    assert f"ckpt_path={checkpoint}" in out and f"scripts/sample.py ckpt={checkpoint}" in out
    assert (tmp_path / "broken" / "loss.png").exists()

    # resume by naming the run directory alone
    run_script("train.py", *RUN, f"data.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'resumed'}",
               f"ckpt_path={checkpoint}", cwd=tmp_path)
    resumed = iteration_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(stopped_at + 1, 15))
    assert resumed == {step: whole[step] for step in resumed}  # bit for bit


def test_a_second_ctrl_c_quits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    interrupt = GracefulInterrupt()
    interrupt._request_stop(signal.SIGINT, None)
    assert interrupt.signum == signal.SIGINT and exits == []  # the first one only asks to stop
    interrupt._request_stop(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


KILL_DURING_SAVE = """
import sys, torch
from nanogpt_lightning.callbacks import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "weights": torch.ones(10)}, sys.argv[1])
print("first saved", flush=True)
io.save_checkpoint({"step": 2, "weights": torch.randn(100_000_000)}, sys.argv[1])  # 400 MB: slow to write
print("second saved", flush=True)
"""


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    process = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "first saved\n"
    partial = tmp_path / f".last.ckpt.{process.pid}.partial"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 0):
        assert time.monotonic() < deadline, "the second save never started"
        time.sleep(0.005)
    process.kill()
    process.wait()
    assert partial.exists()  # killed while writing, before the rename
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(10))
