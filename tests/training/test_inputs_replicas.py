"""DataLoader input under MirroredStrategy x2 (real gloo processes): each replica loads a disjoint
part of every global batch, the replicas agree from the start, and training matches one process."""

import pytest
import torch

from tests.conftest import read_reports, run_script


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataloader")
    for replicas in (1, 2):
        run_script("dataloader_replicas.py", str(folder / f"r{replicas}"), str(replicas), timeout=600)
    return {n: read_reports(folder / f"r{n}", n) for n in (1, 2)}


def test_each_replica_loads_a_disjoint_half_of_every_epoch(runs):
    one, (first, second) = runs[1][0], runs[2]
    assert not set(first["loaded"][:100]) & set(second["loaded"][:100])
    assert sorted(first["loaded"][:100] + second["loaded"][:100]) == list(range(200))
    assert len(first["loaded"]) == len(second["loaded"]) == 200  # two epochs of 100 each
    assert sorted(first["loaded"] + second["loaded"]) == sorted(one["loaded"])


def test_evaluate_before_fit_under_two_replicas_equals_one_process(runs):
    single, (first, second) = runs[1][0]["before"], runs[2]
    assert first["before"] == second["before"]
    assert first["before"] == pytest.approx(single, rel=1e-5)


def test_two_replicas_train_like_one_process_on_the_same_loader(runs):
    single, (first, second) = runs[1][0], runs[2]
    assert first["parameters"] == second["parameters"]
    for mine, theirs in zip(first["parameters"], single["parameters"]):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=1e-4, atol=1e-5)
    assert first["history"]["loss"] == pytest.approx(single["history"]["loss"], rel=1e-4)
