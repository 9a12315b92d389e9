"""Ctrl+C and SIGTERM, exact resume (training and evaluation) and atomic checkpoints, through the real scripts."""

import errno
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from helpers import ITER_LINE, ROOT, STEP_LINE, TINY_RUN, run_script
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.train.callbacks import GracefulInterrupt
from nanogpt_lightning.train.checkpoint_io import AtomicCheckpointIO
from test_train import train_in_process

# dropout on, so the resumed run must also restore torch's random generator
SETTINGS = ["model.dropout=0.1", "trainer.accumulate_grad_batches=2", "trainer.max_steps=14", "eval_interval=5",
            "log_interval=1"]
RUN = [*TINY_RUN, *SETTINGS]


class SignalAt(L.Callback):
    """Sends this process `signum` when iteration `iteration` ends, as a user or a scheduler would, but at a
    known moment (a signal sent from outside lands wherever the fast tiny run happens to be)."""

    def __init__(self, iteration: int, signum: int):
        self.iteration = iteration
        self.signum = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.iteration and batch_idx % trainer.accumulate_grad_batches == 1:
            os.kill(os.getpid(), self.signum)


def train(tmp_path, *overrides, signal_at: tuple[int, int] | None = None, check: bool = True):
    signalling = [] if signal_at is None else [
        "+callbacks.signal._target_=test_interrupt.SignalAt", f"+callbacks.signal.iteration={signal_at[0]}",
        f"+callbacks.signal.signum={int(signal_at[1])}"]
    return run_script("train.py", *RUN, f"data.data_dir={tmp_path / 'data'}", *overrides, *signalling,
                      cwd=tmp_path, check=check, env={"PYTHONPATH": str(ROOT / "tests")})


def losses(stdout: str) -> tuple[dict[int, str], dict[int, tuple[str, str]]]:
    """The printed training loss of each iteration and the evaluation figures of each step (times left out)."""
    return ({int(n): loss for n, loss, _ in ITER_LINE.findall(stdout)},
            {int(n): figures for n, *figures in STEP_LINE.findall(stdout)})


def test_ctrl_c_and_sigterm_save_and_the_resumed_run_repeats_the_unbroken_one_exactly(tmp_path):
    # the unbroken run in this process (the same run as the script's, without its seconds of start-up)
    whole = train_in_process(tmp_path / "whole", *SETTINGS, f"data.data_dir={tmp_path / 'data'}")
    whole_iters, whole_steps = losses(whole)
    assert sorted(whole_iters) == list(range(1, 15)) and sorted(whole_steps) == [5, 10, 14]  # and the last iteration

    # Ctrl+C during iteration 3: the run finishes the iteration in hand, the next one, saves and stops
    run = tmp_path / "broken"
    stopped = train(tmp_path, f"hydra.run.dir={run}", signal_at=(3, signal.SIGINT), check=False)
    assert stopped.returncode == 0, stopped.stderr
    assert "Traceback" not in stopped.stderr and "SIGINT: stopping after this iteration" in stopped.stderr
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"] == 4
    assert f"stopped at iteration 4; checkpoint saved: {checkpoint}" in stopped.stdout
    assert f"ckpt_path={checkpoint}" in stopped.stdout and f"scripts/sample.py ckpt={checkpoint}" in stopped.stdout
    assert "stopped at iteration 4" in (run / "train.log").read_text()
    assert (run / "loss.png").exists()

    # resumed in place (ckpt_path names the run directory), then stopped by SIGTERM, as a scheduler does
    terminated = train(tmp_path, f"hydra.run.dir={run}", f"ckpt_path={run}", signal_at=(7, signal.SIGTERM),
                       check=False)
    assert terminated.returncode == 128 + signal.SIGTERM, terminated.stderr
    assert "Traceback" not in terminated.stderr and "Warning" not in terminated.stderr
    assert torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"] == 8

    # and resumed once more to the end (in this process: the script's resume in place is the run above)
    final = train_in_process(run, *SETTINGS, f"data.data_dir={tmp_path / 'data'}", f"ckpt_path={checkpoint}")
    assert torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"] == 14
    printed = [losses(stopped.stdout), losses(terminated.stdout), losses(final)]
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


def test_a_kill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_and_the_next_run_clears_the_rest(tmp_path):
    """A process (a fork of this one: no seconds of imports) saves once, then starts a second save that writes
    part of the file and never finishes; it is killed there."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(10)}, path)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)

            def slow_save(obj, f):
                f.write(b"part of a checkpoint")
                f.flush()
                os.write(write_end, b"writing")
                time.sleep(600)

            torch.save = slow_save  # this process's torch only
            io.save_checkpoint({"step": 2}, path)
        finally:
            os._exit(1)
    os.close(write_end)
    try:
        assert os.read(read_end, 100) == b"writing"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
    partial = tmp_path / f".last.ckpt.{pid}.partial"
    assert partial.read_bytes() == b"part of a checkpoint"  # killed while writing, before the rename
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(10))
    ours = tmp_path / f".best.ckpt.{os.getpid()}.partial"  # a live process's write in progress stays
    ours.write_bytes(b"")
    AtomicCheckpointIO.remove_stale_partial_files(tmp_path)
    assert not partial.exists() and ours.exists()


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def disk_full(obj, f):
        f.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError) as err:
        io.save_checkpoint({"step": 2}, path)
    assert str(err.value) == (f"cannot write the checkpoint {path} (No space left on device); the previous last.ckpt "
                              "is whole; free some space or make the directory writable, then resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left
    assert torch.load(path, weights_only=True) == {"step": 1}


@pytest.mark.parametrize("signum, status, said", [
    (signal.SIGINT, 130, "stopped by Ctrl+C before training began; nothing saved"),
    (signal.SIGTERM, 143, "stopped by SIGTERM before training began; nothing saved"),
])
def test_a_run_stopped_before_training_leaves_no_run_directory(tmp_path, signum, status, said):
    """Stopped the moment its run directory is locked (Hydra's start-up, then PyTorch's imports, follow):
    before, `.lock` (and after a second `.hydra/` and `train.log`) stayed behind."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *RUN, f"hydra.run.dir={run}",
                                f"data.data_dir={tmp_path / 'data'}"], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / ".lock").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status, stderr
    assert stderr.strip() == said
    assert not run.exists()
