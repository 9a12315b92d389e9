"""Bad input through the real scripts/train.py: one `error:` line saying what to do, exit 1, no traceback,
and no file of the prepared data or of a previous run touched.

Every case runs in its own directory holding a copy of a prepared data directory (`data/`) and, for the
resume cases, of a finished run (`prev/`, with checkpoints/last.ckpt); those files must be byte-identical
afterwards. The cases run two at a time (those past the config checks are mostly ~5 s of imports each), so
there is one per way a run is refused; the refusals' other cases are unit tests: bad config values in
tests/test_config.py, a resume with a changed setting or on other data below and in tests/test_checkpoints.py.
"""

import hashlib
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import SONNETS, TINY_RUN, prepare_text, run_script
from test_train import train_in_process


def unavailable_accelerator() -> tuple[str | None, str]:
    """A device this machine lacks, and the ones it has, as the error lists them."""
    available = ["cpu"] + [name for name, ok in (("cuda", torch.cuda.is_available()),
                                                  ("mps", torch.backends.mps.is_available())) if ok]
    missing = next((name for name in ("mps", "cuda") if name not in available), None)
    return missing, ", ".join(available)


MISSING_ACCELERATOR, AVAILABLE = unavailable_accelerator()


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# id: (the overrides, given the case directory; what the one error line must contain)
CASES = {
    "missing input file": (lambda d: [f"data.input_file={d / 'nope.txt'}"],
                           "data.input_file={d}/nope.txt does not exist or names no file; pass a UTF-8 text file"),
    "unknown config group option": (lambda d: ["model=gpt5"], "model=gpt5 is not an option of model; pass one of: "
                                                              "gpt, modern"),
    "a key the chosen optimizer lacks": (lambda d: ["optimizer.momentum=0.9"],
                                         "optimizer.momentum is not a setting of the optimizer chosen, optimizer=muon "
                                         "has it; pass optimizer=muon too, or drop optimizer.momentum"),
    "a run directory from an unset variable": (
        lambda d: ["hydra.run.dir=${oc.env:NANOGPT_UNSET}"],
        "hydra.run.dir cannot be resolved (KeyError raised while resolving interpolation: \"Environment variable "
        "'NANOGPT_UNSET' not found\"), got ${oc.env:NANOGPT_UNSET}; fix the interpolation or pass a value"),
    "a checkpoint path from an unset variable": (
        lambda d: ["ckpt_path=${oc.env:NANOGPT_UNSET}"],
        "ckpt_path cannot be resolved (KeyError raised while resolving interpolation"),
    "n_embd not divisible by n_head": (lambda d: ["model.n_embd=30", "model.n_head=4"],
                                       "model.n_embd (30) must be divisible by model.n_head (4)"),
    "an optimizer key the chosen optimizer lacks": (  # e.g. Muon's, left by an experiment after optimizer=adamw
        lambda d: ["optimizer=adamw", "+optimizer.adamw_lr=0.01"],
        "optimizer.adamw_lr is not a setting of this optimizer (adamw); drop it with ~optimizer.adamw_lr"),
    "a trainer key Lightning lacks": (  # checked against Trainer's signature, as the callbacks' and loggers' keys
        lambda d: ["+trainer.max_stepz=3"],
        "trainer.max_stepz is not a setting of this trainer (Trainer); drop it with ~trainer.max_stepz"),
    "truncated checkpoint": (
        lambda d: [f"ckpt_path={write(d / 'torn.ckpt', (d / 'prev/checkpoints/last.ckpt').read_bytes()[:5000])}"],
        "cannot read checkpoint {d}/torn.ckpt, it is truncated or not a checkpoint ("),
    "unavailable accelerator": (
        lambda d: [f"trainer.accelerator={MISSING_ACCELERATOR}"],
        f"trainer.accelerator={MISSING_ACCELERATOR} is not available here; available: {AVAILABLE} "
        "(or trainer.accelerator=auto)"),
    "run directory not writable": (
        lambda d: [f"hydra.run.dir={write(d / 'a_file', b'x') / 'run'}"],
        "cannot write the run directory {d}/a_file/run ({d}/a_file is not a directory); "
        "pass a writable hydra.run.dir=DIR"),
    "a new run in a directory holding a run": (
        lambda d: [f"hydra.run.dir={d / 'prev'}"],
        "{d}/prev already holds a run (checkpoints/); resume it with ckpt_path={d}/prev, "
        "or pass another hydra.run.dir=DIR"),
    "resume a finished run": (
        lambda d: [f"ckpt_path={d / 'prev'}", "trainer.max_steps=2"],
        "the run of {d}/prev/checkpoints/last.ckpt is already complete: it reached iteration 2 of "
        "trainer.max_steps=2; pass a larger trainer.max_steps to train further"),
}
RESUME_CASES = ("truncated checkpoint", "a new run in a directory holding a run", "resume a finished run")
# refused while the command line is read: the error line is all there is on stderr (before: Hydra's six lines,
# a traceback, a two-line warning)
COMMAND_LINE_CASES = ("unknown config group option", "a key the chosen optimizer lacks",
                      "a run directory from an unset variable", "a checkpoint path from an unset variable")
SKIPPED = {  # not run
    "unavailable accelerator": MISSING_ACCELERATOR is None,  # every device is here
}


def fingerprints(case_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(case_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for top in ("data", "prev") for p in sorted((case_dir / top).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case in its own directory, two at a time; the resume cases once a tiny run, trained meanwhile in this
    process (the same run as train.py's, without its start-up), is there."""
    root = tmp_path_factory.mktemp("errors")
    prepare_text(SONNETS, root / "data", "char")  # what train.py prepares, so it is not prepared again

    def run_case(name):
        case_dir = root / name.replace(" ", "_").replace("'", "")
        shutil.copytree(root / "data", case_dir / "data")
        if name in RESUME_CASES:
            shutil.copytree(root / "prev", case_dir / "prev")
        before = fingerprints(case_dir)
        overrides, _ = CASES[name]
        result = run_script("train.py", *TINY_RUN, f"data.data_dir={case_dir / 'data'}",
                            f"hydra.run.dir={case_dir / 'run'}", *overrides(case_dir), cwd=case_dir, check=False)
        return case_dir, before, result

    names = [name for name in CASES if not SKIPPED.get(name)]
    with ThreadPoolExecutor(2) as pool:
        started = {name: pool.submit(run_case, name) for name in names if name not in RESUME_CASES}
        train_in_process(root / "prev", f"data.data_dir={root / 'data'}", "trainer.max_steps=2", "eval_interval=2")
        started |= {name: pool.submit(run_case, name) for name in names if name in RESUME_CASES}
        return {name: future.result() for name, future in started.items()}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_exit_1_and_loses_nothing(outcomes, name):
    if SKIPPED.get(name):
        pytest.skip("every accelerator is available here")
    case_dir, before, result = outcomes[name]
    stderr = result.stderr
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert fingerprints(case_dir) == before  # nothing of the data or the previous run touched
    assert before  # ... and there was something to touch
    assert not (case_dir / "run").exists()  # a run that never started leaves no run directory
    expected = CASES[name][1]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0]  # the last word
    assert errors[0].startswith("error: " + expected.replace("{d}", str(case_dir))), stderr
    if name in COMMAND_LINE_CASES:
        assert stderr.strip() == errors[0]


@pytest.mark.parametrize("overrides, message", [
    (["foo=1"], "foo is not a setting; check its spelling (`python scripts/{script} --cfg job` shows every setting), "
                "or add a key of your own with +foo=1"),
    (["optimizer=nope"], "optimizer=nope is not an option of optimizer; pass one of: adamw, muon"),
    (["model.n_layer=[1"], "cannot read an override (no viable alternative at input '[1'); quote values holding "
                           "spaces, commas or brackets"),
    (["data.input_file=a b, c"], "data.input_file=a b, c: a comma makes it a list or a sweep; to pass it as text "
                                 "quote it: \"data.input_file='a b, c'\" (a sweep needs -m)"),
    (["hydra/launcher=slurm_gpu"], "hydra/launcher=slurm_gpu needs Hydra's submitit_slurm plugin, which is not "
                                   "installed: pip install -e '.[slurm]'"),
    (["hydra/launcher=submitit_slurm"], "hydra/launcher=submitit_slurm needs Hydra's submitit_slurm plugin"),
])
def test_a_command_line_hydra_cannot_apply_is_one_line(monkeypatch, tmp_path, overrides, message):
    """What Hydra says in six to twelve lines (its search path, a tip about HYDRA_FULL_ERROR), as one line
    (config.hydra_error_line); the launcher's plugin is removed as if its extra were not installed."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.plugins import Plugins

    from nanogpt_lightning.errors import UserError
    from nanogpt_lightning.train.settings import compose_train_config

    Plugins.instance()  # the installed plugins put their configs into the ConfigStore
    monkeypatch.delitem(ConfigStore.instance().repo["hydra"]["launcher"], "submitit_slurm.yaml")
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)
    with pytest.raises(UserError) as err:
        compose_train_config(overrides, output_dir=str(tmp_path))
    assert str(err.value).startswith(message.format(script="train.py"))  # not started as a script: the training


def test_a_resume_with_a_changed_setting_or_on_other_data_is_refused(tmp_path):
    """The resume refusals that no case above reaches, through checkpoints.resume_path (as train.py calls it);
    the checks themselves: tests/test_checkpoints.py."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from nanogpt_lightning.errors import UserError
    from nanogpt_lightning.model.config import GPTConfig
    from nanogpt_lightning.train.checkpoints import CHECKPOINT_KEY
    from nanogpt_lightning.train.run import RESUMABLE_CHANGES, resume_path

    config = GPTConfig(block_size=16, vocab_size=38, n_layer=1, n_head=2, n_embd=32)
    tokenizer = {"kind": "char", "chars": "x", "vocab_size": 38}
    data = {"source": "/x/sonnets.txt", "source_sha256": "a" * 64, "source_bytes": 10, "tokenizer": "char",
            "val_fraction": 0.1, "tokens": {"train": 9, "val": 1}}
    settings = {"optimizer.lr": 3e-3, "trainer.max_steps": 2, "seed": 1337}
    last = write(tmp_path / "prev" / "checkpoints" / "last.ckpt", b"")
    meta = {"model_config": asdict(config), "tokenizer": tokenizer, "data": data, "settings": settings}
    torch.save({"global_step": 2, "state_dict": {}, CHECKPOINT_KEY: meta}, last)

    def resume(data=data, allow_other_data=False, **changed):
        module = SimpleNamespace(model_config=config, tokenizer=tokenizer, data=data,
                                 run_settings={**settings, "trainer.max_steps": 4, **changed})
        return resume_path(str(tmp_path / "prev"), module, 4, None, allow_other_data, RESUMABLE_CHANGES)

    assert resume() == last  # further iterations of the same run
    with pytest.raises(UserError) as err:
        resume(**{"optimizer.lr": 0.01})
    assert str(err.value) == (f"checkpoint {last} was trained with other settings: optimizer.lr=0.01 (checkpoint: "
                              "0.003); resume with the checkpoint's settings, or start a new run from its weights with "
                              f"the new settings: model.init_from={last} (a fresh optimizer and schedule, the same "
                              "model shape)")
    other = {**data, "source": "/x/reversed.txt", "source_sha256": "b" * 64}
    with pytest.raises(UserError) as err:
        resume(data=other)
    assert str(err.value).startswith(f"checkpoint {last} was trained on sonnets.txt (sha256 aaaaaaaaaaaa..., "
                                     "10 bytes), char tokenizer, 10% val, this run's data is reversed.txt (sha256 bbb")
    assert resume(data=other, allow_other_data=True) == last


@pytest.mark.parametrize("overrides, message", [
    (["+callbacks.model_checkpoint.monitr=x"], "callbacks.model_checkpoint.monitr is not a setting of this callback "
                                               "(ModelCheckpoint); drop it with ~callbacks.model_checkpoint.monitr"),
    (["+logger.nme=x"], "logger.nme is not a setting of this logger (TensorBoardLogger); drop it with ~logger.nme"),
    (["logger=many", "+logger.csv.nme=x"],
     "logger.csv.nme is not a setting of this logger (CSVLogger); drop it with ~logger.csv.nme"),
    (["+trainer.plugins.0.nme=x"],
     "trainer.plugins.0.nme is not a setting of this plugin (AtomicCheckpointIO); drop it with ~trainer.plugins.0.nme"),
    (["logger=many", "+logger.tensorboard.flush_secs=30"], None),  # TensorBoardLogger passes it to its SummaryWriter
])
def test_a_callback_logger_or_plugin_key_its_target_lacks_is_one_line_before_anything_is_built(
        tmp_path, monkeypatch, overrides, message):
    """build_trainer checks every config with _target_ of trainer, callbacks and logger against its target's
    signature before it builds any (the Trainer's own keys: the script case above)."""
    from hydra.core.hydra_config import HydraConfig

    from nanogpt_lightning.errors import UserError
    from nanogpt_lightning.train import run
    from nanogpt_lightning.train.settings import compose_train_config

    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # compose sets it: put it back
    cfg = compose_train_config([*TINY_RUN, *overrides], output_dir=str(tmp_path))
    built = []
    monkeypatch.setattr(run, "instantiate", lambda config, *args, **kwargs: built.append(config))
    if message is None:
        run.build_trainer(cfg)
        assert built  # checked, then built
        return
    with pytest.raises(UserError) as err:
        run.build_trainer(cfg)
    assert str(err.value) == message
    assert built == []


BROKEN_PIPE = """
from nanogpt_lightning.errors import exit_on_user_error

@exit_on_user_error
def main():
    while True:
        print("a line of generated text")

main()
"""


def test_a_reader_that_leaves_early_ends_a_script_quietly(tmp_path):
    """`sample.py | head -1`: no BrokenPipeError traceback once head has read its line."""
    command = f"{sys.executable} -c '{BROKEN_PIPE}' | head -1"
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.stdout == "a line of generated text\n"
    assert result.stderr == ""


def test_ctrl_c_during_a_held_block_is_raised_when_the_block_ends():
    """A KeyboardInterrupt inside an import leaves modules half-made (PyTorch's start-up then aborts the process):
    the scripts hold Ctrl+C over their imports and take it afterwards."""
    import os
    import signal

    from nanogpt_lightning.errors import ctrl_c_held

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a test worker may ignore SIGINT
    reached_the_end_of_the_block = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_held():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # bytecodes at which Python would have run a raising handler
                    pass
                reached_the_end_of_the_block = True
        assert reached_the_end_of_the_block
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler before the block is back
        with ctrl_c_held():  # no interrupt: nothing raised
            pass
    finally:
        signal.signal(signal.SIGINT, previous)
