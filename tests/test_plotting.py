"""Loss plots from TensorBoard runs, sweeps and pasted text logs; loss.png at the end of training."""

import io
import math
import os
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib import cbook
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from helpers import TINY_RUN, fit_tiny, run_script
from nanogpt_lightning import plotting
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.metrics import EVAL_BPB_TAGS, EVAL_LOSS_TAGS, ITER_LOSS_TAG
from nanogpt_lightning.plotting import (
    curves_from_text,
    labels,
    load_inputs,
    loss_figure,
    plot_curves,
    plot_loss,
    smooth,
)
from nanogpt_lightning.train import callbacks
from nanogpt_lightning.train.callbacks import IterationLogger, LossPlot

ITERS = {step: 4.0 - step / 8 for step in range(1, 13)}  # exact in float32, as TensorBoard stores them
EVALS = {6: (3.25, 3.5), 12: (2.5, 2.75)}  # step: (train, val)

PASTED_LOG = """\
step 0: train loss 4.5000, val loss 4.6250
Epoch 0:  50%|#####     | 6/12 [00:01<00:01]
""" + "".join(f"iter {s}: loss {v:.4f}, time 12.34ms, mfu -100.00%\n" for s, v in ITERS.items() if s < 6) + """\
iter 6: loss 3.2500, time 11.00ms
step 6: train loss 3.2500, val loss 3.5000
"""


def write_run(run: Path, iters: dict, evals: dict, config: str | None = None) -> Path:
    """A run directory as training leaves it: TensorBoard events (and the Hydra config)."""
    with SummaryWriter(str(run / "tensorboard")) as writer:
        for step, loss in iters.items():
            writer.add_scalar(ITER_LOSS_TAG, loss, step)
        for step, (train, val) in evals.items():
            writer.add_scalar(EVAL_LOSS_TAGS["train"], train, step)
            writer.add_scalar(EVAL_LOSS_TAGS["val"], val, step)
            writer.add_scalar(EVAL_BPB_TAGS["val"], val / math.log(2), step)  # an ASCII character model's
    if config is not None:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(config)
    return run


def line_data(fig) -> list[tuple[list, list]]:
    return [(list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_tensorboard_run_is_read_and_drawn_with_its_own_numbers(tmp_path):
    run = write_run(tmp_path / "run", ITERS, EVALS)
    out = io.StringIO()
    path = plot_loss([str(run)], out=out)
    assert path == run / "loss.png" and out.getvalue() == f"{path}\n"
    assert_png(path)
    [curves] = load_inputs([str(run)])
    assert (curves.iters.steps, curves.iters.values) == (list(ITERS), list(ITERS.values()))
    assert curves.evals["train"].values == [t for t, _ in EVALS.values()]
    assert (curves.evals["val"].steps, curves.evals["val"].values) == ([6, 12], [3.5, 2.75])
    raw, smoothed, train_points, val_points = line_data(loss_figure([curves], "t"))[:4]
    assert raw == (list(ITERS), list(ITERS.values()))
    assert smoothed == (list(ITERS), smooth(list(ITERS.values())))
    assert val_points == ([6, 12], [3.5, 2.75])


def test_pasted_log_gives_the_picture_of_the_same_run(tmp_path):
    pasted = curves_from_text(PASTED_LOG, "stdin")
    assert pasted.iters.steps == [1, 2, 3, 4, 5, 6]
    assert pasted.iters.values == [ITERS[s] for s in range(1, 7)]
    assert (pasted.evals["train"].values, pasted.evals["val"].values) == ([4.5, 3.25], [4.625, 3.5])
    assert math.isnan(pasted.final_val_bpb)  # nanoGPT's lines have no bits per byte; ours do
    ours = curves_from_text("step 6: train loss 3.2500, val loss 3.5000, val bpb 5.0494\n", "ours")
    assert (ours.val_bpb.steps, ours.final_val_bpb, ours.final_val_loss) == ([6], 5.0494, 3.5)

    path = plot_loss(["-"], output=str(tmp_path / "pasted.png"), stdin=io.StringIO(PASTED_LOG), out=io.StringIO())
    assert_png(path)
    run = write_run(tmp_path / "run", {s: ITERS[s] for s in range(1, 7)}, {0: (4.5, 4.625), 6: EVALS[6]})
    [from_events] = load_inputs([str(run)])
    assert line_data(loss_figure([pasted], "t")) == line_data(loss_figure([from_events], "t"))


def test_text_log_file_is_plotted_beside_it(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(PASTED_LOG)
    assert plot_loss([str(log)], out=io.StringIO()) == tmp_path / "train.png"


def test_sweep_runs_are_labelled_by_what_differs_and_ranked_by_val_loss(tmp_path):
    sweep = tmp_path / "sweep"
    config = "seed: 1337\nmodel:\n  n_layer: 2\n  n_embd: {}\noptimizer:\n  lr: 0.001\n"
    for name, n_embd, final_val in [("0_model.n_embd=16", 16, 3.0), ("1_model.n_embd=32", 32, 2.0),
                                    ("10_model.n_embd=64", 64, 2.5)]:
        write_run(sweep / name, ITERS, {12: (final_val - 0.25, final_val)}, config.format(n_embd))
    out = io.StringIO()
    assert plot_loss([str(sweep)], out=out) == sweep / "loss.png"
    assert out.getvalue().splitlines() == [
        "run                 val loss  val bpb  n_embd",
        "1_model.n_embd=32   2.0000    2.8854   32",
        "10_model.n_embd=64  2.5000    3.6067   64",
        "0_model.n_embd=16   3.0000    4.3281   16",
        str(sweep / "loss.png"),
    ]
    curves = load_inputs([str(sweep)])
    assert [c.name for c in curves] == ["0_model.n_embd=16", "1_model.n_embd=32", "10_model.n_embd=64"]
    assert labels(curves) == ["0_model.n_embd=16: n_embd=16", "1_model.n_embd=32: n_embd=32",
                              "10_model.n_embd=64: n_embd=64"]


def train_run(run: Path, *overrides: str) -> Path:
    """A real tiny run (in this process) with the Hydra config scripts/train.py would save beside it."""
    from nanogpt_lightning.train.settings import compose_train_config
    from test_train import train_in_process

    train_in_process(run, *overrides)
    (run / ".hydra").mkdir()
    OmegaConf.save(compose_train_config([*TINY_RUN, *overrides]), run / ".hydra" / "config.yaml")
    return run


def test_runs_are_compared_by_the_settings_that_shape_their_results(tmp_path):
    # three loggers (each records the settings its own way), a wider model, another optimizer and log interval
    common = [f"data.data_dir={tmp_path / 'data'}", "trainer.max_steps=4", "eval_interval=2"]
    runs = [train_run(tmp_path / "runA", *common, "logger=csv"),
            train_run(tmp_path / "runB", *common, "logger=many", "model.n_embd=64", "log_interval=2"),
            train_run(tmp_path / "runC", *common, "optimizer=muon")]
    out = io.StringIO()
    path = plot_loss([str(r) for r in runs], output=str(tmp_path / "compare.png"), out=out)
    assert Image.open(path).size == (1200, 720)  # plotting.FIGURE_SIZE at its dpi, whatever the labels
    table = out.getvalue().splitlines()
    assert table[0].split() == ["run", "val", "loss", "val", "bpb", "n_embd", "optimizer", "weight_decay",
                                "momentum", "ns_steps", "adamw_lr", "adamw_weight_decay"]  # not log_interval
    assert [line.split()[0] for line in table[1:4]] == ["runB", "runA", "runC"]  # ranked by val loss
    assert table[-1] == str(path) and max(map(len, table)) <= plotting.TABLE_WIDTH
    curves = load_inputs([str(r) for r in runs])
    assert labels(curves) == ["runA: n_embd=32 optimizer=adamw weight_decay=0.1",
                              "runB: n_embd=64 optimizer=adamw weight_decay=0.1",
                              "runC: n_embd=32 optimizer=muon weight_decay=0 momentum=0.95…"]
    assert curves[2].settings["model.tie_embeddings"] is True  # TensorBoard's 1.0, typed by the config


def test_ten_runs_keep_the_figure_size_and_short_plain_labels(tmp_path):
    # runs without a settings record (as with wandb alone): compared by their Hydra configs, `${...}` and all
    config = "optimizer:\n" + "".join(f"  a_rather_long_setting_name_{i}: {{n}}\n" for i in range(8)) + \
        "logger:\n  save_dir: ${{hydra:runtime.output_dir}}/{n}\n"
    runs = [write_run(tmp_path / f"run${n}$", ITERS, EVALS, config.format(n=n)) for n in range(10)]
    fig = loss_figure(load_inputs([str(r) for r in runs]), " ".join(map(str, runs)))
    fig.canvas.draw()
    texts = [t.get_text() for t in fig.legends[0].get_texts()] + [fig.axes[0].get_title()]
    assert len(texts) == 13 and all(len(t.replace("\\$", "$")) <= plotting.LABEL_WIDTH for t in texts[:-1])
    assert texts[0].startswith("run\\$0\\$: a_rather_long_setting_name_0=0") and texts[0].endswith("…")
    assert not any(cbook.is_math_text(t) for t in texts)  # `$` drawn as itself, never as mathematics
    assert fig.legends[0].get_window_extent().width <= fig.bbox.width
    out = io.StringIO()
    path = plot_loss([str(r) for r in runs], output=str(tmp_path / "ten.png"), out=out)
    assert Image.open(path).size == (1200, 720)
    table = out.getvalue().splitlines()
    assert max(map(len, table)) <= plotting.TABLE_WIDTH and table[-1] == str(path)
    left_out = " ".join(table[11:-1])  # below the header and the 10 runs
    assert left_out.startswith("also differ: a_rather_long_setting_name_") and left_out.endswith(", save_dir")
    assert len(table[0].split()) + left_out.count(",") + 1 == 3 + 2 + 9  # run, val loss, val bpb, the 9 settings


def test_smoothing_follows_a_falling_loss_instead_of_lagging_above_it():
    rng = np.random.default_rng(0)
    steps = np.arange(400)
    raw = 1.5 + 3.0 * np.exp(-steps / 80) + rng.normal(0, 0.15, steps.size)
    smoothed = np.array(smooth(raw.tolist()))
    assert abs(np.mean(smoothed - raw)) < 0.01  # a moving average of the past: ~0.12 above
    assert 0.4 < np.mean(smoothed > raw) < 0.6
    assert np.std(smoothed - 1.5 - 3.0 * np.exp(-steps / 80)) < 0.05  # it smooths: the noise is 0.15
    assert smoothed[[0, -1]] == pytest.approx(raw[[0, -1]])  # the window shrinks to stay centred


def test_smoothing_keeps_a_constant_and_few_points_and_passes_nan_through():
    assert smooth([2.3] * 500) == pytest.approx([2.3] * 500)
    assert smooth([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]  # few points: drawn as they are
    values = [1.0, math.nan, 1.0, math.inf] * 20
    smoothed = smooth(values)
    assert math.isnan(smoothed[1]) and smoothed[3] == math.inf
    assert smoothed[::2] == [1.0] * 40  # the non-finite neighbours are left out of the means


def test_inputs_without_losses_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no TensorBoard events under"):
        load_inputs([str(tmp_path / "empty")])
    with pytest.raises(UserError, match="no losses found in stdin"):
        load_inputs(["-"], stdin_text="nothing to see\n")
    with pytest.raises(UserError, match="does not exist"):
        load_inputs([str(tmp_path / "missing")])


def assert_one_error_line(result, *words: str) -> None:
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr


def test_script_error_is_one_line_and_exit_1(tmp_path):
    result = run_script("plot_loss.py", str(tmp_path), cwd=tmp_path, check=False)
    assert_one_error_line(result, "no TensorBoard events under")


def test_unsupported_output_format_is_refused_before_reading(tmp_path):
    # the input does not exist either: the output is checked first, before the slow part
    result = run_script("plot_loss.py", "missing", "-o", "loss.xyz", cwd=tmp_path, check=False)
    assert_one_error_line(result, "loss.xyz", "unsupported image format", ".png", ".pdf", ".svg")
    result = run_script("plot_loss.py", "missing", "-o", "compare", cwd=tmp_path, check=False)
    assert_one_error_line(result, "compare", "unsupported image format")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # the script's own cache only


def test_output_under_a_file_is_refused_and_nothing_written(tmp_path):
    run = write_run(tmp_path / "run", ITERS, EVALS)
    (tmp_path / "notes").write_text("a file")
    result = run_script("plot_loss.py", str(run), "-o", "notes/plots/loss.png", cwd=tmp_path, check=False)
    assert_one_error_line(result, "notes/plots/loss.png", "notes is a file", "choose another path")
    assert (tmp_path / "notes").read_text() == "a file" and not (run / "loss.png").exists()


def test_output_that_is_a_directory_is_refused(tmp_path):
    run = write_run(tmp_path / "run", ITERS, EVALS)
    with pytest.raises(UserError, match=f"cannot write {tmp_path}: it is a directory; give a file name"):
        plot_loss([str(run)], output=str(tmp_path), out=io.StringIO())
    assert not (run / "loss.png").exists()


def test_output_in_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", ITERS, EVALS)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root may write anywhere: the refusal any other user gets, simulated
        access = os.access
        monkeypatch.setattr(plotting.os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
        with pytest.raises(UserError, match=r"locked/sub/loss.png: no permission to write in .*; choose another path"):
            plot_loss([str(run)], output=str(locked / "sub" / "loss.png"), out=io.StringIO())
    else:
        result = run_script("plot_loss.py", str(run), "-o", "locked/sub/loss.png", cwd=tmp_path, check=False)
        assert_one_error_line(result, "locked/sub/loss.png", "no permission to write in", "choose another path")
    assert list(locked.iterdir()) == []


def test_other_formats_by_extension(tmp_path):
    run = write_run(tmp_path / "run", ITERS, EVALS)
    assert plot_loss([str(run)], output=str(tmp_path / "loss.svg"), out=io.StringIO()).read_text().startswith("<?xml")


class InterruptAt(L.Callback):
    """Ctrl+C after the given iteration."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.fixture
def plotted(monkeypatch) -> list:
    """The curves LossPlot draws, as read at that moment."""
    drawn = []

    def spy(curves, out, title):
        drawn.extend(curves)
        return plot_curves(curves, out, title)

    monkeypatch.setattr(callbacks, "plot_curves", spy)
    return drawn


def test_training_end_writes_loss_png_into_the_run_dir(tmp_path, plotted):
    run = tmp_path / "run"
    fit_tiny(run, 6, IterationLogger(), LossPlot(), logger=TensorBoardLogger(run, name="tensorboard", version=""))
    assert_png(run / "loss.png")
    [curves] = plotted
    assert curves.iters.steps == [1, 2, 3, 4, 5, 6] and len(curves.evals["val"].steps) == 2
    assert curves.iters.values == load_inputs([str(run)])[0].iters.values


def test_ctrl_c_still_writes_loss_png(tmp_path, plotted):
    run = tmp_path / "run"
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown on KeyboardInterrupt
            fit_tiny(run, 100, IterationLogger(), LossPlot(), InterruptAt(4),
                     logger=TensorBoardLogger(run, name="tensorboard", version=""))
    finally:
        signal.signal(signal.SIGINT, sigint_handler)  # Lightning ignores further Ctrl+C after the first
    assert_png(run / "loss.png")
    assert plotted[0].iters.steps == [1, 2, 3, 4]
