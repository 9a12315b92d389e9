"""Ctrl+C and SIGTERM, exact resume (training and evaluation) and atomic checkpoints, through the real scripts."""

import os
import signal
import subprocess
import sys

import torch

from nanogpt_lightning.callbacks import AtomicCheckpointIO, GracefulInterrupt

from conftest import ITER_LINE, ROOT, STEP_LINE, TINY_RUN, run_script

# dropout on, so the resumed run must also restore torch's random generator
RUN = [*TINY_RUN, "model.dropout=0.1", "trainer.accumulate_grad_batches=2", "trainer.max_steps=14",
       "eval_interval=5", "log_interval=1"]


def start_training(tmp_path, run_name, *overrides):
    command = [sys.executable, "-u", str(ROOT / "scripts" / "train.py"), *RUN,
               f"data.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / run_name}", *overrides]
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process, prefix) -> str:
    """The output up to and including the first line starting with `prefix`."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return "".join(lines)
    raise AssertionError(f"no line starting {prefix!r}; stderr:\n{process.stderr.read()}")


def losses(stdout: str) -> tuple[dict[int, str], dict[int, tuple[str, str]]]:
    """The printed training loss of each iteration and the evaluation losses of each step (times left out)."""
    return ({int(n): loss for n, loss, _ in ITER_LINE.findall(stdout)},
            {int(n): (train, val) for n, train, val in STEP_LINE.findall(stdout)})


def interrupt(process, at_line: str, signum: int) -> tuple[str, str]:
    """Send `signum` once `at_line` is printed; the whole stdout and stderr."""
    head = wait_for_line(process, at_line)
    process.send_signal(signum)
    rest, err = process.communicate(timeout=120)
    return head + rest, err


def test_ctrl_c_and_sigterm_save_and_the_resumed_run_repeats_the_unbroken_one_exactly(tmp_path):
    whole = run_script("train.py", *RUN, f"data.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'whole'}",
                       cwd=tmp_path)
    whole_iters, whole_steps = losses(whole.stdout)
    assert sorted(whole_iters) == list(range(1, 15)) and sorted(whole_steps) == [5, 10]

    # Ctrl+C early in the run
    process = start_training(tmp_path, "broken")
    out, err = interrupt(process, "iter 3:", signal.SIGINT)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    checkpoint = tmp_path / "broken" / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"]
    assert 3 <= stopped_at < 5
    assert f"stopped at iteration {stopped_at}; checkpoint saved: {checkpoint}" in out
    assert f"ckpt_path={checkpoint}" in out and f"scripts/sample.py ckpt={checkpoint}" in out
    assert f"stopped at iteration {stopped_at}" in (tmp_path / "broken" / "train.log").read_text()
    assert (tmp_path / "broken" / "loss.png").exists()

    # resumed in place (ckpt_path names the run directory), then stopped by SIGTERM, as a scheduler does
    resumed = start_training(tmp_path, "broken", f"ckpt_path={tmp_path / 'broken'}")
    rest, err = interrupt(resumed, "iter 7:", signal.SIGTERM)
    assert resumed.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    stopped_again = torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"]
    assert 7 <= stopped_again < 10

    # and resumed once more to the end
    final = run_script("train.py", *RUN, f"data.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'broken'}",
                       f"ckpt_path={checkpoint}", cwd=tmp_path)
    printed = [losses(out), losses(rest), losses(final.stdout)]
    resumed_iters = {n: loss for iters, _ in printed for n, loss in iters.items()}
    resumed_steps = {n: loss for _, steps in printed for n, loss in steps.items()}
    assert resumed_iters == whole_iters  # bit for bit, training and evaluation alike
    assert resumed_steps == whole_steps


def test_a_second_ctrl_c_quits_at_once_and_removes_the_checkpoint_it_was_writing(monkeypatch, tmp_path):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    partial = tmp_path / f".last.ckpt.{os.getpid()}.partial"
    partial.write_bytes(b"half a checkpoint")
    monkeypatch.setattr(AtomicCheckpointIO, "_writing", {partial})
    interrupt = GracefulInterrupt()
    interrupt._request_stop(signal.SIGINT, None)
    assert interrupt.signum == signal.SIGINT and exits == []  # the first one only asks to stop
    assert partial.exists()
    interrupt._request_stop(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]
    assert not partial.exists()


# saves once, then starts a second save that writes part of the file and never finishes
SLOW_SAVE = """
import sys, time, torch
from nanogpt_lightning.callbacks import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "weights": torch.ones(10)}, sys.argv[1])
def slow_save(obj, f):
    f.write(b"part of a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
torch.save = slow_save
io.save_checkpoint({"step": 2}, sys.argv[1])
"""


def test_a_kill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_and_the_next_run_clears_the_rest(tmp_path):
    path = tmp_path / "last.ckpt"
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    process.kill()
    process.wait()
    partial = tmp_path / f".last.ckpt.{process.pid}.partial"
    assert partial.read_bytes() == b"part of a checkpoint"  # killed while writing, before the rename
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(10))
    ours = tmp_path / f".best.ckpt.{os.getpid()}.partial"  # a live process's write in progress stays
    ours.write_bytes(b"")
    AtomicCheckpointIO.remove_stale_partial_files(tmp_path)
    assert not partial.exists() and ours.exists()
