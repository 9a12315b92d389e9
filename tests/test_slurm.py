"""A sweep submitted to a real SLURM cluster through the submitit launcher (hydra/launcher=slurm_gpu).

Opt-in: NANOGPT_TEST_SLURM=1 with a cluster answering `sinfo` (`../shared/tools/local-slurm` starts a one-node
one on this machine). The jobs run on CPUs, so the launcher's GPU settings are overridden as a CPU-only user
would; the run directories are checked as for a local sweep.
"""

import os
import re
import shutil
import subprocess

import pytest
import torch

from helpers import TINY_RUN, run_script

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    os.environ.get("NANOGPT_TEST_SLURM") != "1" or shutil.which("sinfo") is None
    or subprocess.run(["sinfo"], capture_output=True).returncode != 0,
    reason="opt-in: NANOGPT_TEST_SLURM=1 and a SLURM cluster (../shared/tools/local-slurm)")]
CPU_JOB = ["hydra.launcher.gpus_per_node=null", "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10", "trainer.accelerator=cpu"]


def test_a_two_job_sweep_runs_as_two_slurm_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY_RUN if not o.startswith("model.n_embd=")]
    result = run_script("train.py", "-m", "hydra/launcher=slurm_gpu", *CPU_JOB, *tiny, "model.n_embd=16,32",
                        "trainer.max_steps=4", "eval_interval=2", f"data.data_dir={tmp_path / 'data'}",
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    for job, width in (("0", 16), ("1", 32)):
        checkpoint = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
        assert checkpoint["global_step"] == 4
        assert checkpoint["state_dict"]["model.transformer.wte.weight"].shape[1] == width
        assert "step 4: train loss" in (sweep / job / "train.log").read_text()
    # submitit's record: one SLURM job array (the launcher's array_parallelism) of two tasks, each with its log
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert [t.split("_")[1] for t in tasks] == ["0", "1"] and len({t.split("_")[0] for t in tasks}) == 1
    assert all((sweep / ".submitit" / t / f"{t}_0_log.out").is_file() for t in tasks)
