"""Dynamic batching merges requests that arrive together and splits the answers back."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from distsave.serving.batching import SignatureRunner
from tests.serving.conftest import images


def _run_together(runner: SignatureRunner, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    async def main():
        return await asyncio.gather(*(runner.run({"x": x}) for x in inputs))
    return asyncio.run(main())


def test_requests_within_the_window_run_as_one_batch_and_get_their_own_rows(loaded):
    signature = loaded.signatures["serving_default"]
    calls: list[int] = []
    inputs = [images(1 + i % 2, seed=i) for i in range(6)]
    with ThreadPoolExecutor(1) as executor:
        runner = SignatureRunner(signature, executor, max_batch_size=64, timeout=0.5, on_batch=calls.append)
        answers = _run_together(runner, inputs)
    assert calls == [9]
    for x, answer in zip(inputs, answers):
        torch.testing.assert_close(answer["output_0"], signature(x)["output_0"], rtol=0, atol=1e-5)


def test_batches_stop_at_max_batch_size_and_batching_off_runs_each_request(loaded):
    signature = loaded.signatures["serving_default"]
    batched, single = [], []
    inputs = [images(1, seed=i) for i in range(5)]
    with ThreadPoolExecutor(1) as executor:
        _run_together(SignatureRunner(signature, executor, max_batch_size=2, timeout=0.5,
                                      on_batch=batched.append), inputs)
        _run_together(SignatureRunner(signature, executor, max_batch_size=0, on_batch=single.append), inputs)
    assert batched == [2, 2, 1] and single == [1] * 5
