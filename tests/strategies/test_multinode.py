"""MultiWorkerMirroredStrategy as users run it: two torchrun agents (--nnodes 2, c10d rendezvous
on localhost), one CPU process each, gloo."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, SCRIPTS, cnn_model, read_reports, run_python, scale

import distsave


def start_nodes(tmp_path, mode: str) -> list[subprocess.Popen]:
    from distsave.strategies.launcher import _free_port

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", "distsave-test", "--max-restarts", "0", "--monitor-interval", "0.5",
         str(SCRIPTS / "multinode.py"), str(tmp_path / "n"), mode],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank in range(2)]


def test_two_nodes_train_like_one_and_save_once(tmp_path, mnist):
    nodes = start_nodes(tmp_path, "train")
    for node in nodes:
        _, err = node.communicate(timeout=240)
        assert node.returncode == 0, err[-3000:]
    reports = read_reports(tmp_path / "n", 2)
    assert {r["replicas"] for r in reports} == {2}
    replicas = [load_file(tmp_path / f"n.{r}.safetensors") for r in range(2)]
    single = cnn_model(optimizer="sgd")  # the same global batch of 64 in one process
    torch.manual_seed(0)
    single.fit(mnist["train"].take(512).map(scale).batch(64), epochs=1, verbose=0)
    for name, tensor in single.state_dict().items():
        assert torch.equal(replicas[0][name], replicas[1][name]), name
        torch.testing.assert_close(replicas[0][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    loaded = distsave.load_model(tmp_path / "n.artifact")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".artifact")) == ["n.artifact"]
    images = next(iter(mnist["test"].take(8).map(scale).batch(8)))[0]
    torch.testing.assert_close(loaded.predict(images), single.predict(images), rtol=1e-4, atol=1e-4)
    under_two = run_python(["-c", (  # loaded and run under Mirrored x2 (forked replicas)
        "import torch, distsave\n"
        "with distsave.MirroredStrategy(devices=['cpu', 'cpu']).scope():\n"
        f"    model = distsave.load_model({str(tmp_path / 'n.artifact')!r})\n"
        "print(model.predict(torch.zeros(4, 1, 28, 28)).shape)")], timeout=120)
    assert "torch.Size([4, 10])" in under_two.stdout


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's torchrun agent and its workers at once, as a lost machine. torchrun
    starts each worker in a session of its own: the agent's process group alone would leave
    the worker training on."""
    workers = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
               and _parent_of(entry) == node.pid]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    node.wait(timeout=30)


def _parent_of(process: Path) -> int | None:
    try:
        return int((process / "stat").read_text().rpartition(")")[2].split()[1])  # state, then ppid
    except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
        return None


def test_killing_one_node_fails_the_other_within_the_timeout(tmp_path):
    nodes = start_nodes(tmp_path, "forever")
    try:
        assert nodes[1].stdout.readline().strip() == "training"  # node 1's worker is in fit
        kill_node(nodes[1])
        _, err = nodes[0].communicate(timeout=120)  # gloo's 30 s timeout at most, plus the agent's exit
        assert nodes[0].returncode != 0, err[-2000:]
    finally:
        for node in nodes:
            kill_node(node)
