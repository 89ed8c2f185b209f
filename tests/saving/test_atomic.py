"""A process killed in the middle of model.save never damages the artifact it replaces."""

import signal

import pytest
import torch

from tests.conftest import run_script, tiny_model

import distsave
from distsave.saving.manifest import read_manifest


@pytest.mark.parametrize("point", ["weights", "manifest", "fsync", "swap"])
def test_sigkill_during_save_leaves_a_complete_artifact(tmp_path, point):
    target = tmp_path / "model"
    old = tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    old.save(target)
    x = torch.rand(4, 1, 28, 28)
    expected_old = old.predict(x)

    result = run_script("save_and_die.py", str(target), point, timeout=120, check=False)
    assert result.returncode == -signal.SIGKILL

    read_manifest(target)  # every checksum verifies
    restored = distsave.load_model(target)
    if point == "swap":  # killed after the swap: the new artifact is complete in place
        assert not torch.equal(restored.predict(x), expected_old)
    else:
        assert torch.equal(restored.predict(x), expected_old)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model"]
    assert all(name.startswith(".model.distsave-tmp-") for name in leftovers)

    old.save(target)  # the next save clears what the killed one left
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
