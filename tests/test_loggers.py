"""Loggers: CSV, TensorBoard and CSV together (logger=many), wandb offline; loss.png and plot_loss from any of them."""

import shutil
import sys

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from helpers import fit_tiny
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.plotting import curves_from_events, plot_loss, run_curves
from nanogpt_lightning.train.callbacks import FINAL_TAGS, IterationLogger, LossPlot, RunSummary
from nanogpt_lightning.train.loggers import wandb_logger


def series(curves) -> dict:
    """Each curve's points as {(name, step): value}."""
    named = {"iters": curves.iters, "val_bpb": curves.val_bpb, **curves.evals}
    return {(name, step): value for name, s in named.items() for step, value in zip(s.steps, s.values)}


def test_a_csv_logged_run_draws_loss_png_with_the_numbers_tensorboard_has(tmp_path):
    both = tmp_path / "both"  # logger=many: TensorBoard and CSV side by side
    fit_tiny(both, 6, IterationLogger(1), RunSummary(), LossPlot(),
             logger=[TensorBoardLogger(both, name="tensorboard", version=""), CSVLogger(both, name="csv")])
    tensorboard = series(curves_from_events(both / "tensorboard", "both"))
    assert sorted(tensorboard) == sorted([("iters", s) for s in range(1, 7)]
                                         + [(name, s) for name in ("train", "val", "val_bpb") for s in (3, 6)])
    assert (both / "loss.png").is_file() and (both / "csv" / "version_0" / "hparams.yaml").is_file()

    shutil.rmtree(both / "tensorboard")  # what the CSV logs alone give: the same numbers
    assert series(run_curves(both)) == pytest.approx(tensorboard, rel=1e-7)
    (both / "loss.png").unlink()
    assert plot_loss([str(both)], out=sys.stderr) == both / "loss.png" and (both / "loss.png").is_file()

    alone = tmp_path / "csv"  # logger=csv: loss.png at the end of training from the CSV logs
    fit_tiny(alone, 3, IterationLogger(1), RunSummary(), LossPlot(), logger=CSVLogger(alone, name="csv"))
    assert (alone / "loss.png").is_file()
    metrics = (alone / "csv" / "version_0" / "metrics.csv").read_text()
    assert FINAL_TAGS["val/loss"] in metrics.splitlines()[0]  # the final metrics, as HPARAMS has them


def test_wandb_runs_offline_without_an_api_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_logger(save_dir=str(tmp_path), project="p")._offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_logger(save_dir=str(tmp_path), project="p")._offline is False
    assert wandb_logger(save_dir=str(tmp_path), project="p", offline=True)._offline is True


def test_wandb_not_installed_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match=r"logger=wandb needs the wandb package: pip install -e '.\[wandb\]'"):
        wandb_logger(save_dir=str(tmp_path), project="p")
