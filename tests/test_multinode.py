"""Two machines, simulated: two `torchrun` "nodes" on this one (gloo over 127.0.0.1), one process each.

The run they make together is the run one machine makes with two processes: one run directory, each line
once, the same losses and weights; and its checkpoint resumes on a single process.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ITER_LINE, ROOT, SONNETS, STEP_LINE, TINY_RUN, prepare_text

TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 4
RUN = [*TINY_RUN, f"trainer.max_steps={STEPS}", "eval_interval=2", "callbacks.progress_bar.refresh_rate=0"]

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file() or not torch.distributed.is_gloo_available(),
                                reason="needs torchrun and PyTorch's gloo backend")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cwd: Path, launch: list[str], *overrides: str) -> subprocess.Popen:
    """scripts/train.py under torchrun, as a user would start it on a machine (`cwd`: a folder of its own)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(cwd.parent / "cache")}
    return subprocess.Popen([str(TORCHRUN), *launch, str(ROOT / "scripts" / "train.py"), *RUN, *overrides],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, f"{process.args}\n{out}\n{err}"
    return out


def iterations(text: str) -> list[tuple[int, str]]:
    return [(int(n), loss) for n, loss, _ in ITER_LINE.findall(text)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run on two nodes of one process each, and on one node of two processes (at once)."""
    tmp = tmp_path_factory.mktemp("multinode")
    # prepared once before, as on a cluster: each process of a run checks the data, none prepares it
    prepare_text(SONNETS, tmp / "data", "char")
    data = f"data.data_dir={tmp / 'data'}"
    for start in ("node0", "node1", "single"):
        (tmp / start).mkdir()
    port, single_port = free_port(), free_port()
    # each node composes its own config: the run directory is named, the default one has the time in it
    two_nodes = [f"hydra.run.dir={tmp / 'two_nodes'}", "trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.devices=1",
                 data]
    nodes = [torchrun(tmp / f"node{rank}", ["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                                            "--master-addr", "127.0.0.1", "--master-port", str(port)], *two_nodes)
             for rank in (0, 1)]
    single = torchrun(tmp / "single", ["--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                       "--master-port", str(single_port)],
                      f"hydra.run.dir={tmp / 'one_node'}", "trainer=ddp_cpu", "trainer.devices=2", data)
    node0, node1 = (finish(node) for node in nodes)
    return tmp, node0, node1, finish(single)


def test_two_nodes_write_one_run_directory_and_log_each_line_once(runs):
    tmp, node0, node1, _ = runs
    run = tmp / "two_nodes"
    assert iterations(node0) == iterations((run / "train.log").read_text())
    assert [n for n, _ in iterations(node0)] == list(range(1, STEPS + 1))
    assert [int(s) for s, *_ in STEP_LINE.findall(node0)] == [2, 4]
    assert ", 256 tokens per iteration, cpu x 2 in 32-true, run directory" in node0  # 8 x 16 tokens x 2 nodes
    assert node1 == ""  # the second node's process prints nothing
    assert [p.name for p in run.rglob("config.yaml")] == ["config.yaml"]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    for node in ("node0", "node1"):  # no run directory of their own where the nodes started
        assert not any((tmp / node).iterdir()), list((tmp / node).iterdir())


def test_two_nodes_train_as_one_node_of_two_processes(runs):
    tmp, node0, _, single = runs
    assert iterations(node0) and [loss for _, loss in iterations(node0)] == [loss for _, loss in iterations(single)]
    assert STEP_LINE.findall(node0) == STEP_LINE.findall(single)
    two_nodes, one_node = (torch.load(tmp / run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
                           for run in ("two_nodes", "one_node"))
    assert two_nodes["global_step"] == one_node["global_step"] == STEPS
    for name, weight in two_nodes["state_dict"].items():
        assert torch.equal(weight, one_node["state_dict"][name]), name


def test_the_two_node_checkpoint_resumes_on_one_process(runs, tmp_path, capsys):
    """In this process (trainer.devices=1, the default trainer), to further iterations."""
    from hydra.core.hydra_config import HydraConfig

    from nanogpt_lightning.train.run import train
    from nanogpt_lightning.train.settings import compose_train_config

    tmp, _, _, _ = runs
    run = tmp / "two_nodes"
    before = HydraConfig.instance().cfg
    cfg = compose_train_config([*RUN, f"data.data_dir={tmp / 'data'}", f"trainer.max_steps={STEPS + 2}",
                                "trainer.accelerator=cpu", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
                               output_dir=str(tmp_path / "resumed"))
    try:
        train(cfg)
    finally:
        HydraConfig.instance().cfg = before
    out = capsys.readouterr().out
    assert f"resumed from iteration {STEPS} of {run}" in out
    assert [n for n, _ in iterations(out)] == [STEPS + 1, STEPS + 2]
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert resumed["global_step"] == STEPS + 2
