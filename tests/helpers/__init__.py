"""What the tests share: the small real texts, a tiny run's settings, the lines a run prints, and running the
real scripts (each in a process of its own: forkserver.py) or a tiny fit (in this process)."""

import atexit
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
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
ITER_LINE = re.compile(r"^iter (\d+): loss (\d+\.\d{4}), time (\d+\.\d{2})ms, mfu \d+\.\d{2}%$", re.M)
STEP_LINE = re.compile(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4}), val bpb (\d+\.\d{4})$", re.M)


# the scripts that import PyTorch and Lightning: run forked from a server that has imported them (forkserver.py)
FORKED = ("train.py", "sample.py", "eval.py", "export.py")
TIMEOUT_S = 300


def run_script(script: str, *args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None,
               stdin: str = "") -> subprocess.CompletedProcess:
    """Run scripts/<script> as a user would, `stdin` its standard input; no network-dependent cache is shared
    with the user's."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(cwd / "cache"), **(env or {})}
    path = str(ROOT / "scripts" / script)
    if script in FORKED and os.environ.get("NANOGPT_TEST_FORK") != "0":
        result = _forked(path, list(args), cwd, env, stdin)
    else:
        result = subprocess.run([sys.executable, path, *args], cwd=cwd, env=env, input=stdin, capture_output=True,
                                text=True, timeout=TIMEOUT_S)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


_server: subprocess.Popen | None = None
_server_lock = threading.Lock()  # one run at a time per server (a test may run scripts from two threads)


def _reply(server: subprocess.Popen, timeout: float) -> dict:
    if not select.select([server.stdout], [], [], timeout)[0]:
        raise subprocess.TimeoutExpired(server.args, timeout)
    line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"the script server ended (status {server.wait()})")
    return json.loads(line)


def _forked(path: str, args: list[str], cwd: Path, env: dict[str, str], stdin: str) -> subprocess.CompletedProcess:
    global _server
    with _server_lock, tempfile.TemporaryDirectory() as tmp:
        if _server is None or _server.poll() is not None:
            _server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py"))],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            atexit.register(_server.kill)
            _reply(_server, TIMEOUT_S)  # ready
        given, out, err = Path(tmp, "stdin"), Path(tmp, "stdout"), Path(tmp, "stderr")
        given.write_text(stdin)
        request = {"script": path, "args": args, "cwd": str(cwd), "env": env, "stdin": str(given), "stdout": str(out),
                   "stderr": str(err)}
        _server.stdin.write((json.dumps(request) + "\n").encode())
        pid = _reply(_server, TIMEOUT_S)["pid"]
        try:
            returncode = _reply(_server, TIMEOUT_S)["returncode"]
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            _reply(_server, TIMEOUT_S)
            raise
        return subprocess.CompletedProcess([sys.executable, path, *args], returncode,
                                           out.read_text(errors="replace"), err.read_text(errors="replace"))


def fit_tiny(run: Path, max_steps: int, *callbacks, val_check_interval: int = 3, ckpt_path=None,
             lr: float = 1e-3, lr_decay_iters: int = 10, **trainer_kwargs):
    """Train a tiny GPT on the sonnets in this process (no script start-up); returns the trainer."""
    from functools import partial

    import lightning as L

    from nanogpt_lightning.data.datamodule import TextDataModule
    from nanogpt_lightning.model.config import GPTConfig
    from nanogpt_lightning.train.module import GPTModule
    from nanogpt_lightning.train.optimizers import adamw
    from nanogpt_lightning.train.schedules import WarmupCosineLR

    data = TextDataModule(data_dir=str(run.parent / "data"), input_file=str(SONNETS), block_size=8,
                          batch_size=2, eval_iters=1)
    data.prepare_data()
    module = GPTModule(GPTConfig(block_size=8, vocab_size=data.vocab_size, n_layer=1, n_head=1, n_embd=8),
                       data.meta["tokenizer"], optimizer=partial(adamw, lr=lr, weight_decay=0.0, betas=(0.9, 0.99)),
                       scheduler=partial(WarmupCosineLR, warmup_iters=1, lr_decay_iters=lr_decay_iters,
                                         min_lr=1e-4))
    trainer = L.Trainer(**{"logger": False, **trainer_kwargs}, max_steps=max_steps, max_epochs=-1,
                        val_check_interval=val_check_interval, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def prepare_text(path: Path, data_dir: Path, tokenizer: str, val_fraction: float = 0.1) -> Path:
    """Prepare a local text as `data=text data.input_file=PATH` does; returns its prepared directory."""
    from nanogpt_lightning.data.datamodule import TextDataModule

    data = TextDataModule(data_dir=str(data_dir), tokenizer=tokenizer, input_file=str(path), val_fraction=val_fraction)
    data.prepare_data()
    return data.prepared_dir
