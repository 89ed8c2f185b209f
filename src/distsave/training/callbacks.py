"""Callbacks: hooks that `fit` calls; History and the progress bar are callbacks too."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

__all__ = ["Callback", "History", "ProgressBar"]

Logs = dict[str, Any]


class Callback:
    """Override the hooks you need. ``logs`` values may be device tensors; read them sparingly."""

    model: Any = None
    params: dict[str, Any] = {}

    def set_model(self, model: Any) -> None:
        self.model = model

    def set_params(self, params: dict[str, Any]) -> None:
        """``epochs``, ``steps`` (per epoch) and ``verbose`` of the running ``fit``; also its
        ``data`` and the train step's ``metrics`` (loss first), for exact resume."""
        self.params = params

    def on_train_begin(self, logs: Logs | None = None) -> None: ...
    def on_train_end(self, logs: Logs | None = None) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None: ...
    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None: ...
    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None: ...

    def on_epoch_batches(self, epoch: int, batches: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        """The epoch's ``(index, batch)`` pairs, called after ``on_epoch_begin``; a callback
        may skip the batches a resumed run already trained."""
        return batches

    def on_preempted(self, epoch: int, batch: int) -> str | None:
        """SIGTERM stops the fit after ``batch`` batches of ``epoch`` (every replica calls this);
        save what must survive, and return a note for the exit message."""
        return None


class History(Callback):
    """Per-epoch metric values, as floats: ``history.history["loss"]``."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))


def _format(logs: Logs) -> str:
    return " - ".join(f"{k}: {float(v):.4f}" for k, v in logs.items())


class ProgressBar(Callback):
    """A Keras-style line per epoch: ``938/938 [====] - 3s 3ms/step - loss: 0.19 - accuracy: 0.94``.

    On a terminal the line updates live; metric tensors are read (a device sync) at most once
    per ``interval`` seconds, never per step. Elsewhere (logs, CI) only the final line is printed.
    """

    _FORMAT = "{n_fmt}/{total_fmt} [{bar:30}] - {elapsed_s:.0f}s {desc}"

    def __init__(self, interval: float = 0.25, live: bool | None = None):
        self.interval = interval
        self.live = sys.stdout.isatty() if live is None else live
        self._bar: tqdm | None = None

    def on_epoch_begin(self, epoch, logs=None):
        print(f"Epoch {epoch + 1}/{self.params['epochs']}", flush=True)
        self._start = self._last = time.monotonic()
        self._steps = 0
        if self.live:
            self._bar = tqdm(total=self.params.get("steps"), file=sys.stdout, ascii=".=",
                             mininterval=self.interval, bar_format=self._FORMAT)

    def _description(self, logs: Logs) -> str:
        per_step = (time.monotonic() - self._start) / max(self._steps, 1)
        pace = f"{per_step * 1e3:.0f}ms/step" if per_step >= 1e-3 else f"{per_step * 1e6:.0f}us/step"
        return f"{pace} - {_format(logs)}"

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1
        if self._bar is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._bar.set_description_str(self._description(logs or {}), refresh=False)
        self._bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        description = self._description(logs or {})
        if self._bar is not None:
            self._bar.set_description_str(description, refresh=False)
            self._bar.close()
            return
        total = self.params.get("steps") or self._steps
        print(tqdm.format_meter(self._steps, total, time.monotonic() - self._start, ascii=".=",
                                bar_format=self._FORMAT, prefix=description), flush=True)


def read_logs(logs: Logs) -> dict[str, float]:
    """Floats from possibly-device tensors (one sync for the lot)."""
    tensors = {k: v for k, v in logs.items() if isinstance(v, torch.Tensor)}
    values = torch.stack([t.detach().double().cpu() for t in tensors.values()]).tolist() if tensors else []
    return {**logs, **dict(zip(tensors, values))}
