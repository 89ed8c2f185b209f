"""Dynamic batching: requests that arrive within a time window run as one batch.

Every signature call runs on one model thread shared by the server (PyTorch already uses every
core inside an operator, so a second concurrent call would only compete for them). Without
batching each request is one call. With batching, requests for one signature queue up; the
first one opens a window of ``timeout`` seconds (counted from its arrival, so time spent waiting
for the model thread counts), and every compatible request that arrives in it, up to
``max_batch_size`` rows, is concatenated along the batch dimension, run once, and split again.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from ..saved_model import ConcreteSignature

__all__ = ["SignatureRunner"]


@dataclass
class _Pending:
    tensors: dict[str, torch.Tensor]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def key(self) -> tuple:
        """Requests with the same non-batch dimensions can share a batch."""
        return tuple(tuple(t.shape[1:]) for t in self.tensors.values())


class SignatureRunner:
    """Runs one signature on the model thread, batching requests when asked.

    Args:
        signature: The loaded signature.
        executor: The server's single model thread.
        max_batch_size: Rows per batch; 0 or 1 turns batching off.
        timeout: Seconds the first request of a batch waits for others.
        batchable: Whether every input and output has a batch dimension (else never batched).
        on_batch: Called with the number of rows of each call (for metrics).
    """

    def __init__(self, signature: ConcreteSignature, executor: Executor, *, max_batch_size: int = 0,
                 timeout: float = 0.0, batchable: bool = True,
                 on_batch: Callable[[int], None] | None = None):
        self.signature = signature
        self._executor = executor
        self._max_rows = max_batch_size if batchable and max_batch_size > 1 else 0
        self._timeout = timeout
        self._on_batch = on_batch or (lambda rows: None)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrival = asyncio.Event()
        self._collector: asyncio.Task | None = None

    def _call(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {k: v.detach().cpu() for k, v in self.signature(**tensors).items()}

    async def run(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The signature's outputs for these inputs (awaits the model thread)."""
        loop = asyncio.get_running_loop()
        pending = _Pending(tensors, loop.create_future())
        if not self._max_rows or pending.rows >= self._max_rows:
            self._on_batch(pending.rows)
            return await loop.run_in_executor(self._executor, self._call, tensors)
        self._queue.append(pending)
        self._arrival.set()
        if self._collector is None or self._collector.done():
            self._collector = loop.create_task(self._collect())
        return await pending.future

    async def _collect(self) -> None:
        """Form and run batches until the queue is empty, then end (a new request restarts it)."""
        while self._queue:
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            deadline = first.arrived + self._timeout
            while rows < self._max_rows:
                if not self._queue:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._arrival.clear()
                    try:
                        await asyncio.wait_for(self._arrival.wait(), remaining)
                    except TimeoutError:
                        break
                    continue
                candidate = self._queue[0]
                if candidate.key != first.key or rows + candidate.rows > self._max_rows:
                    break
                batch.append(self._queue.popleft())
                rows += candidate.rows
            await self._run_batch(batch, rows)

    async def _run_batch(self, batch: list[_Pending], rows: int) -> None:
        names = list(batch[0].tensors)
        inputs = {n: torch.cat([p.tensors[n] for p in batch]) if len(batch) > 1 else batch[0].tensors[n]
                  for n in names}
        self._on_batch(rows)
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._call, inputs)
            if any(t.ndim == 0 or t.shape[0] != rows for t in outputs.values()):
                raise RuntimeError(f"signature {self.signature.name!r} returned outputs without a batch "
                                   f"dimension of {rows}; it cannot be batched")
            parts = {n: t.split([p.rows for p in batch]) for n, t in outputs.items()}
        except Exception as error:  # every request of the batch gets the failure
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        for i, p in enumerate(batch):
            if not p.future.done():
                p.future.set_result({n: part[i] for n, part in parts.items()})
