"""Shared fixtures: a small real text, and running the real scripts in a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# the tests run two at a time (pytest-xdist) and often two scripts each: one thread per process keeps the
# cores from being oversubscribed (idle OpenMP threads spin), and the tiny models gain nothing from more
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
SONNETS = ROOT / "tests" / "data" / "sonnets.txt"
TINY_SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# a model small enough to train in a few seconds on a CPU
TINY_RUN = [
    "data=text", f"data.input_file={SONNETS}", "data.block_size=16", "data.batch_size=8",
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
    "optimizer.lr=3e-3", "scheduler.warmup_iters=5", "scheduler.lr_decay_iters=1000",
    "eval_iters=2",
]
# the lines a run prints (nanoGPT's)
ITER_LINE = re.compile(r"^iter (\d+): loss (\d+\.\d{4}), time (\d+\.\d{2})ms$", re.M)
STEP_LINE = re.compile(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})$", re.M)


def run_script(script: str, *args: str, cwd: Path, check: bool = True,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run scripts/<script> as a user would; no network-dependent cache is shared with the user's."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(cwd / "cache"), **(env or {})}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def sonnets_text() -> str:
    return SONNETS.read_text()
