"""scripts/bench.py runs all four loops, and two in bf16-mixed, on a tiny config and prints its table, and nothing
of its participants, and leaves nothing in the temporary directory; the plain loop compiled as nanoGPT compiles
it; settings bench refuses in one line."""

import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["plain", "plain+tuned", "lightning", "lightning+fused", "plain bf16-mixed", "lightning+fused bf16-mixed"]


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """The temporary directory of this process and of those it starts: a folder under tmp_path, to see what bench
    leaves there, and so that the tests leave nothing in the machine's."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_bench_prints_its_table_with_real_figures_only(tmp_path, temp_dir):
    text = tmp_path / "text.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 60)
    # the progress bar is left on: the participants' output must not reach bench's
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--warmup", "2", "--rounds", "1", "--steps", "1",
         "--precisions", "bf16-mixed",
         "data=text", f"data.input_file={text}", f"data.data_dir={tmp_path / 'data'}", "data.block_size=16",
         "data.batch_size=4", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "trainer.accelerator=cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    # the participants' folder is removed (no --keep-logs); torch may leave its own cache folder (torchinductor_*)
    assert list(temp_dir.glob("nanogpt-bench-*")) == []
    assert "logs in" not in result.stdout
    out = result.stdout
    assert "\r" not in out + result.stderr
    assert not re.search(r"^(plain )?iter ", out, re.MULTILINE), out
    assert "GPU available" not in result.stderr  # Lightning's notes from the participants

    peak_line = next(line for line in out.splitlines() if line.startswith("fp32 matmul peak:"))
    assert "torch.mm" in peak_line and ("oneDNN" in peak_line or "torch.mm again" in peak_line)
    peak = float(re.match(r"fp32 matmul peak: (\S+) GFLOP/s", peak_line).group(1))
    assert math.isfinite(peak) and peak > 0

    table = out[out.index("variant"):].splitlines()
    assert table[0].split() == ["variant", "ms/iter", "p25-p75", "ms", "n", "tokens/s", "GFLOP/s", "%", "peak",
                                "peak", "MB"]
    rows = [row.rsplit(maxsplit=7) for row in table[1:7]]
    assert [row[0] for row in rows] == VARIANTS
    bf16_peak_line = next(line for line in out.splitlines() if line.startswith("bf16-mixed matmul peak:"))
    assert float(re.match(r"bf16-mixed matmul peak: (\S+) GFLOP/s", bf16_peak_line).group(1)) > 0
    for name, ms_per_iter, _, n, tokens_per_s, gflops, percent_peak, _ in rows:
        figures = [float(ms_per_iter), float(tokens_per_s), float(gflops), float(percent_peak.rstrip("%"))]
        assert all(math.isfinite(x) and x > 0 for x in figures), (name, figures)
        assert int(n) == 1  # one round of one step
    assert "time per iteration vs plain:" in out
    assert re.search(r"^in bf16-mixed: lightning\+fused \d+\.\d\dx of plain in bf16-mixed, \d+\.\d\dx of "
                     r"lightning\+fused in 32-true$", out, re.MULTILINE), out


class _CountingClock:
    """Stands in for the bench's Clock: counts the iterations, no turns."""

    def __init__(self):
        self.ticks = 0

    def start(self):
        pass

    def begin_iterations(self):
        pass

    def tick(self):
        self.ticks += 1


def test_plain_loop_compiled_is_nanogpts_compile_of_the_whole_model_and_trains_the_same(
        tmp_path, monkeypatch, capsys):
    """plain+compile: the plain loop on torch.compile(model) (dynamo with its `eager` backend here, so no C++
    build in CI): the compiled model is the GPT itself and its losses equal the uncompiled loop's."""
    import torch

    from nanogpt_lightning.model.gpt import GPT
    from nanogpt_lightning.tools.bench.loops import plain_pytorch_loop
    from nanogpt_lightning.tools.bench.variants import precision_variants, variant_config
    from nanogpt_lightning.train.run import build_datamodule
    from nanogpt_lightning.train.settings import compose_train_config

    real_compile, compiled_models = torch.compile, []

    def eager_compile(model, **kwargs):
        compiled_models.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    text = tmp_path / "text.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 60)
    cfg = compose_train_config(["data=text", f"data.input_file={text}", f"data.data_dir={tmp_path / 'data'}",
                                "data.block_size=16", "data.batch_size=4", "model.n_layer=1", "model.n_head=2",
                                "model.n_embd=32", "log_interval=1"], str(tmp_path / "run"))
    build_datamodule(cfg).prepare_data()
    losses = {}
    for compiled in (False, True):
        clock = _CountingClock()
        config = variant_config(cfg, fused_loss=False, max_steps=6, accelerator="cpu", compiled=compiled)
        plain_pytorch_loop(config, torch.device("cpu"), 6, clock, compiled)
        assert clock.ticks == 6
        losses[compiled] = re.findall(r"^plain iter \d+: loss (\S+)$", capsys.readouterr().out, re.MULTILINE)
    assert len(compiled_models) == 1 and isinstance(compiled_models[0], GPT)
    assert len(losses[True]) == 6 and losses[True] == losses[False]
    compiled = ["plain+compile", "lightning+fused+compile"]
    assert list(precision_variants("32-true", compiled=True)) == VARIANTS[:4] + compiled
    assert precision_variants("bf16-mixed", compiled=True) == ("plain", "lightning+fused", "plain+compile",
                                                               "lightning+fused+compile")


def test_bench_compile_without_a_compiler_is_one_line_and_a_kept_folder_stays(tmp_path, temp_dir, monkeypatch):
    import shutil

    from nanogpt_lightning.errors import UserError
    from nanogpt_lightning.tools.bench.runner import run

    monkeypatch.setattr(shutil, "which", lambda name: None)
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    with pytest.raises(UserError) as err:
        run(["data=text", f"data.input_file={text}", f"data.data_dir={tmp_path / 'data'}", "trainer.accelerator=cpu"],
            1, 1, 1, precisions="", compiled=True, keep_logs=True)
    assert str(err.value) == ("bench.py --compile: torch.compile on cpu needs a C++ compiler (g++ or clang++) on the "
                              "PATH; install one or pass --no-compile")
    assert len(list(temp_dir.glob("nanogpt-bench-*"))) == 1  # kept: keep_logs (--keep-logs)


def test_bench_refuses_a_time_budget_in_one_line_and_leaves_nothing(tmp_path, temp_dir):
    from nanogpt_lightning.errors import UserError
    from nanogpt_lightning.tools.bench.runner import run

    with pytest.raises(UserError) as err:
        run(["data=text", f"data.input_file={tmp_path / 'text.txt'}", "budget_s=60"], 1, 1, 1, precisions="")
    assert str(err.value) == ("bench.py times a fixed number of iterations (--warmup, --rounds, --steps), not a time "
                              "budget: got budget_s=60; pass budget_s=null")
    assert list(temp_dir.glob("nanogpt-bench-*")) == []
