"""A script seeded once (torch.manual_seed, or distsave.utils.set_random_seed) ends with the same
weights, bit for bit, every time it runs in a fresh process."""

from tests.conftest import run_script


def weights_digest(seed: int, how: str) -> str:
    return run_script("seeded_fit.py", str(seed), how, timeout=300).stdout.strip()


def test_the_same_seeded_script_twice_ends_with_identical_weights():
    first = weights_digest(0, "torch")
    assert len(first) == 64
    assert weights_digest(0, "utils") == first  # set_random_seed seeds torch as manual_seed does
    assert weights_digest(1, "torch") != first
