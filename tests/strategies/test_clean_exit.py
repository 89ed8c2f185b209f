"""Replicas exit cleanly after a save: gloo's worker threads must not hold the last reference
to a Python tensor when the interpreter shuts down (that aborts the process with "terminate
called without an active exception", about 1 run in 20 on a busy 2-core machine before the fix
in `strategies/mirrored.py::_settle`)."""

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.conftest import run_script

import distsave

# Each run is three fresh processes (~6 s here, mostly waiting: imports, rendezvous, fsync), so
# two run at once, which also keeps the machine busy, as the abort needs. 10 runs catch a
# 1-in-20 abort in 2 suite runs of 5 (1 - 0.95**10); CI aims for a suite under 10 minutes.
RUNS = 10


def test_ten_two_replica_saves_all_exit_cleanly(tmp_path):
    def run(index: int) -> subprocess.CompletedProcess:
        return run_script("replicas_save.py", str(tmp_path / f"m{index}"), timeout=300, check=False)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(RUNS)))
    failures = [f"run {index}: exit {result.returncode}: {result.stderr[-500:]}"
                for index, result in enumerate(results)
                if result.returncode != 0 or "terminate called" in result.stderr]
    assert not failures, f"{len(failures)} of {RUNS} runs did not exit cleanly:\n" + "\n".join(failures)
    assert distsave.load_model(tmp_path / f"m{RUNS - 1}").inputs[0].shape == (None, 4)


@pytest.mark.parametrize("user_threads", ["one", "more than the cores"])
def test_one_cpu_replica_keeps_the_users_thread_count(user_threads):
    wanted = 1 if user_threads == "one" else (os.cpu_count() or 1) + 1
    previous = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        distsave.MirroredStrategy(devices=["cpu"])
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(previous)
