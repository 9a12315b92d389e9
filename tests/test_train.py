"""End to end: scripts/train.py on a small real text, as a user runs it."""

import contextlib
import fcntl
import io
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from helpers import ITER_LINE, ROOT, STEP_LINE, TINY_RUN, run_script
from nanogpt_lightning.data.prepare import describe_data
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT


def train(tmp_path, run_name, *overrides, check=True):
    return run_script("train.py", *TINY_RUN, f"data.data_dir={tmp_path / 'data'}",
                      f"hydra.run.dir={tmp_path / run_name}", *overrides, cwd=tmp_path, check=check)


def train_in_process(run, *overrides) -> str:
    """What scripts/train.py runs (TINY_RUN and `overrides`, composed and checked as it does, into the run
    directory `run`), in this process: for tests of what a run does, not of the script, without its seconds of
    start-up. Returns what the run printed."""
    from hydra.core.hydra_config import HydraConfig

    from nanogpt_lightning.train.run import train as train_run
    from nanogpt_lightning.train.settings import compose_train_config

    before = HydraConfig.instance().cfg
    printed = io.StringIO()
    try:
        cfg = compose_train_config([*TINY_RUN, *overrides], output_dir=str(run))
        with contextlib.redirect_stdout(printed):
            train_run(cfg)
    finally:
        HydraConfig.instance().cfg = before
    return printed.getvalue()


def step_of(path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """65 iterations (not a multiple of the evaluation interval) of two micro-batches each."""
    tmp_path = tmp_path_factory.mktemp("train")
    result = train(tmp_path, "run", "trainer.max_steps=65", "eval_interval=30", "trainer.accumulate_grad_batches=2")
    return tmp_path, result


def test_training_lowers_the_loss_and_prints_whole_nanogpt_lines(first_run):
    _, result = first_run
    assert "\r" not in result.stdout  # not a terminal: no progress bar frames
    iters = [(int(n), float(loss)) for n, loss, _ in ITER_LINE.findall(result.stdout)]
    assert [n for n, _ in iters] == list(range(1, 66))
    first, last = sum(loss for _, loss in iters[:5]) / 5, sum(loss for _, loss in iters[-5:]) / 5
    assert last < first - 0.5
    steps = STEP_LINE.findall(result.stdout)
    assert [int(s) for s, *_ in steps] == [30, 60, 65]  # 65: the last iteration is always evaluated
    assert float(steps[1][2]) < float(steps[0][2])


def test_start_up_is_one_summary_line_and_the_run_log_records_the_lines(first_run):
    tmp_path, result = first_run
    run = tmp_path / "run"
    lines = result.stdout.splitlines()
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    n_params = GPT(GPTConfig(**saved["nanogpt_lightning"]["model_config"])).num_params(non_embedding=False)
    summary = [line for line in lines if "parameters" in line or line.startswith("data:")]
    [prepared] = [d for d in (tmp_path / "data").iterdir() if not d.name.startswith(".")]
    assert summary[0] == f"data: {describe_data(saved['nanogpt_lightning']['data'])} in {prepared}"
    assert summary[0].startswith("data: sonnets.txt (sha256 ")
    assert summary[1:] == [f"{n_params:,} parameters, 256 tokens per iteration, cpu x 1 in 32-true, "
                           f"run directory {run}"]
    for noise in ("GPU available", "TPU available", "Tip:", "FLOPs", "deprecated", "max_steps=65` reached"):
        assert noise not in result.stdout + result.stderr
    log = (run / "train.log").read_text()
    assert [line for line in log.splitlines() if line] == [line for line in lines if line]  # as printed


def test_on_a_terminal_the_bar_shows_and_every_line_is_printed_above_it(tmp_path):
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows of 120 columns
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *TINY_RUN, f"data.data_dir={tmp_path / 'data'}",
               f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=6", "eval_interval=3"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=child, stderr=child, env={
        **os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    os.close(child)
    output = b""
    while chunk := _read(parent):
        output += chunk
    os.close(parent)
    assert process.wait(timeout=120) == 0
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output.decode())  # without the cursor movements
    assert re.search(r"\| 6/6 \[", text)  # the bar, with its total and ETA
    shown = [line.strip() for line in text.splitlines()]  # splits at \r too: each frame of the bar
    recorded = (tmp_path / "run" / "train.log").read_text().splitlines()
    ours = ("data:", "iter ", "step ")  # the run's lines, printed above the bar, none lost
    assert [line for line in shown if line.startswith(ours)] == [line for line in recorded if line.startswith(ours)]
    assert len([line for line in recorded if line.startswith("iter ")]) == 6
    assert any("parameters, " in line for line in shown)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the child side is closed
        return b""


def test_run_dir_holds_config_tensorboard_curves_and_checkpoints(first_run):
    tmp_path, result = first_run
    run = tmp_path / "run"
    assert (run / ".hydra" / "config.yaml").exists()
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/iter_loss", "train/loss", "val/loss", "perf/ms_per_iter", "perf/tokens_per_sec", "lr"):
        assert tag in tags
    iter_losses = events.Scalars("train/iter_loss")
    assert [e.step for e in iter_losses] == list(range(1, 66))
    printed = [float(loss) for _, loss, _ in ITER_LINE.findall(result.stdout)]
    assert [round(e.value, 4) for e in iter_losses] == pytest.approx(printed, abs=1e-4)
    assert [e.step for e in events.Scalars("val/loss")] == [30, 60, 65]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 65  # the end of training, evaluated though no multiple of the interval
    saved = checkpoint["nanogpt_lightning"]
    assert saved["model_config"]["n_embd"] == 32 and saved["tokenizer"]["kind"] == "char"
    assert saved["data"]["source"].endswith("sonnets.txt") and saved["settings"]["optimizer.lr"] == 3e-3
    assert "hyper_parameters" not in checkpoint  # the model config and tokenizer are stored once
    val_losses = [float(v) for _, _, v, _ in STEP_LINE.findall(result.stdout)]
    assert step_of(run / "checkpoints" / "best.ckpt") == [30, 60, 65][val_losses.index(min(val_losses))]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_hparams_hold_the_settings_that_shape_the_result_and_the_final_losses(first_run):
    tmp_path, result = first_run
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model.n_embd"].number_value == 32
    assert hparams["optimizer.lr"].number_value == pytest.approx(3e-3)
    assert hparams["trainer.accumulate_grad_batches"].number_value == 2
    assert hparams["data.tokenizer"].string_value == "char"
    # each group's _target_ is a setting (a resume that switches the optimizer is refused); paths are not
    assert not [key for key in hparams if "dirpath" in key or "save_dir" in key]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {
        "hp/final_train_loss", "hp/final_val_loss", "hp/final_train_bpb", "hp/final_val_bpb"}
    final_train, final_val, final_val_bpb = map(float, STEP_LINE.findall(result.stdout)[-1][1:])
    final = events.Scalars("hp/final_val_loss")[-1]
    assert final.step == 65 and final.value == pytest.approx(final_val, abs=1e-4)
    assert events.Scalars("hp/final_train_loss")[-1].value == pytest.approx(final_train, abs=1e-4)
    assert events.Scalars("hp/final_val_bpb")[-1].value == pytest.approx(final_val_bpb, abs=1e-4)
    assert events.Scalars("val/bpb")[-1].value == pytest.approx(final_val_bpb, abs=1e-4)
    assert final_val_bpb == pytest.approx(final_val / math.log(2), abs=2e-4)  # ASCII text, one byte per character


def test_resume_continues_the_step_count(first_run):
    """In this process: resuming through the script is tests/test_interrupt.py's (and test_errors.py's refusals)."""
    tmp_path, _ = first_run
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    printed = train_in_process(tmp_path / "resumed", f"data.data_dir={tmp_path / 'data'}", "trainer.max_steps=70",
                               "eval_interval=30", "trainer.accumulate_grad_batches=2", f"ckpt_path={ckpt}")
    assert [int(n) for n, _, _ in ITER_LINE.findall(printed)] == list(range(66, 71))
    first_loss = float(ITER_LINE.findall(printed)[0][1])
    assert first_loss < 3.0  # the trained weights came back, not a fresh model (ln 38 = 3.6)
    assert step_of(tmp_path / "resumed" / "checkpoints" / "last.ckpt") == 70


class FakeValLoss(L.Callback):
    """Replaces the val loss that checkpointing sees with `losses`, one per evaluation (the printed lines keep
    the real ones): lets a test choose a rising val loss."""

    def __init__(self, losses):
        self.losses = list(losses)

    def on_validation_end(self, trainer, pl_module):
        trainer.callback_metrics["val/loss"] = torch.tensor(self.losses.pop(0))


def test_last_checkpoint_is_the_final_iteration_when_the_val_loss_rises(tmp_path):
    """In this process: the checkpoint callbacks of conf/callbacks/default.yaml, not the script, are under test."""
    data = f"data.data_dir={tmp_path / 'data'}"
    train_in_process(tmp_path / "run", data, "trainer.max_steps=9", "eval_interval=2",
                     "+callbacks.fake._target_=test_train.FakeValLoss",
                     "+callbacks.fake.losses=[2.49,2.39,2.48,2.63,2.7]")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert step_of(checkpoints / "best.ckpt") == 4  # the lowest val loss
    assert step_of(checkpoints / "last.ckpt") == 9  # evaluations at 2, 4, 6, 8 and at the end, 9
    resumed = train_in_process(tmp_path / "resumed", data, "trainer.max_steps=11", f"ckpt_path={tmp_path / 'run'}",
                               "eval_interval=2", "+callbacks.fake._target_=test_train.FakeValLoss",
                               "+callbacks.fake.losses=[9,9.5]")
    assert [int(n) for n, _, _ in ITER_LINE.findall(resumed)] == [10, 11]


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path):
    run = tmp_path / "busy"
    run.mkdir()
    with open(run / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a training process holds it
        result = train(tmp_path, "busy", "trainer.max_steps=2", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: another process is training in {run} now; wait for it to end, or pass another hydra.run.dir=DIR")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
