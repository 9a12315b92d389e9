"""What a real run records for resuming, key by key, and that a resume changing any one group is refused.

One tiny run trains with scripts/train.py; every resume attempt fails in its checks, before any training.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import ROOT, TINY_RUN, run_script
from nanogpt_lightning.train.checkpoints import CHECKPOINT_KEY, resolve_checkpoint

CPU_RUN = [*TINY_RUN, "trainer.accelerator=cpu"]
SCALARS = {"data.tokenizer", "data.val_fraction", "data.block_size", "data.batch_size",
           "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.precision", "matmul_precision",
           "trainer.max_steps", "budget_s", "seed"}
GROUPS = {"model": "model/gpt.yaml", "module": "module/default.yaml", "optimizer": "optimizer/adamw.yaml",
          "scheduler": "scheduler/warmup_cosine.yaml"}


def group_keys(group: str) -> set[str]:
    """Every setting of the group's default config file but `_partial_`, as `group.key` (`_target_` is kept:
    a resume that switches the optimizer class is refused too)."""
    node = OmegaConf.load(ROOT / "conf" / GROUPS[group])
    return {f"{group}.{key}" for key in node if key == "_target_" or not str(key).startswith("_")}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("resume_record")
    run_script("train.py", *CPU_RUN, f"data.data_dir={tmp / 'data'}", "trainer.max_steps=4", "eval_interval=4",
               f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    return tmp, tmp / "run"


@pytest.fixture(scope="module")
def settings(run) -> dict:
    path = resolve_checkpoint(str(run[1]))
    return torch.load(path, map_location="cpu", weights_only=False)[CHECKPOINT_KEY]["settings"]


@pytest.mark.parametrize("prefix", ["data.", "model.", "module.", "optimizer.", "scheduler.", "trainer.", ""])
def test_a_real_run_records_exactly_the_settings_that_shape_its_result(settings, prefix):
    expected = SCALARS | set().union(*(group_keys(group) for group in GROUPS))
    if prefix:
        assert {k for k in settings if k.startswith(prefix)} == {k for k in expected if k.startswith(prefix)}
    else:  # the ungrouped ones, and nothing else anywhere
        assert {k for k in settings if "." not in k} == {"matmul_precision", "budget_s", "seed"}
        assert set(settings) == expected
    assert settings.get("trainer.max_steps") == 4 and settings.get("data.batch_size") == 8


OTHER_SETTINGS = "was trained with other settings"
# one change per recorded group; data.tokenizer and data.block_size are refused earlier, by the vocabulary and
# shape checks; data.val_fraction is other data too, so allow_other_data lets it reach the settings check
CHANGES = {
    "data.tokenizer": (["data.tokenizer=gpt2"], "was trained on a char vocabulary"),
    "data.val_fraction": (["data.val_fraction=0.2", "allow_other_data=true"], OTHER_SETTINGS),
    "data.block_size": (["data.block_size=8"], "is not the checkpoint's block size 16"),
    "data.batch_size": (["data.batch_size=4"], OTHER_SETTINGS),
    "model": (["model.dropout=0.1"], OTHER_SETTINGS),
    "module": (["module.skip_nonfinite=true"], OTHER_SETTINGS),
    "optimizer": (["optimizer.lr=1e-3"], OTHER_SETTINGS),
    "scheduler": (["scheduler.warmup_iters=6"], OTHER_SETTINGS),
    "trainer.accumulate_grad_batches": (["trainer.accumulate_grad_batches=2"], OTHER_SETTINGS),
    "trainer.gradient_clip_val": (["trainer.gradient_clip_val=0.5"], OTHER_SETTINGS),
    "trainer.precision": (["trainer.precision=bf16-mixed"], OTHER_SETTINGS),
    "matmul_precision": (["matmul_precision=medium"], OTHER_SETTINGS),
    "seed": (["seed=7"], OTHER_SETTINGS),
}


def resume(tmp: Path, run_dir: Path, name: str, *overrides: str) -> str:
    """A resume of the run, in this process (train() as scripts/train.py calls it); the refusal's text."""
    from nanogpt_lightning.errors import UserError
    from nanogpt_lightning.train.run import train
    from nanogpt_lightning.train.settings import compose_train_config

    cfg = compose_train_config([*CPU_RUN, f"data.data_dir={tmp / 'data'}", "trainer.max_steps=8", "eval_interval=4",
                                f"ckpt_path={run_dir}", *overrides], output_dir=str(tmp / f"resume-{name}"))
    with pytest.raises(UserError) as refused:
        train(cfg)  # refused in its checks: never trains
    return str(refused.value)


@pytest.mark.parametrize("group", CHANGES)
def test_a_resume_that_changes_one_group_is_refused(run, group):
    overrides, message = CHANGES[group]
    refusal = resume(*run, group, *overrides)
    assert message in refusal
    if message == OTHER_SETTINGS:
        changed = overrides[0].split("=")[0]
        assert f" {changed}=" in refusal.split(OTHER_SETTINGS)[1]


def test_the_train_script_refuses_a_resume_with_another_schedule_before_training(run):
    tmp, run_dir = run
    result = run_script("train.py", *CPU_RUN, f"data.data_dir={tmp / 'data'}", "trainer.max_steps=8",
                        "eval_interval=4", f"ckpt_path={run_dir}", "scheduler.lr_decay_iters=500",
                        f"hydra.run.dir={tmp / 'resume-script'}", cwd=tmp, check=False)
    assert result.returncode != 0
    assert OTHER_SETTINGS in result.stderr and "scheduler.lr_decay_iters=500 (checkpoint: 1000)" in result.stderr
    assert "iter " not in result.stdout  # refused before any training


def test_a_resume_that_only_trains_further_is_not_refused_by_the_checks(run, settings):
    from nanogpt_lightning.train.run import RESUMABLE_CHANGES

    assert {"trainer.max_steps", "budget_s"} <= set(RESUMABLE_CHANGES) and set(settings) > set(RESUMABLE_CHANGES) - {
        "model.compile"}
