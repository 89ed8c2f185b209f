"""`CSVLogger`: one row of logged values per epoch, in a CSV file."""

from __future__ import annotations

import csv
import os
from typing import Any, TextIO

from ..training.callbacks import Callback

__all__ = ["CSVLogger"]


class CSVLogger(Callback):
    """Append ``epoch`` and every logged value to ``filename`` after each epoch (chief only).

    Args:
        filename: The CSV file.
        separator: The field separator.
        append: Keep an existing file and add rows (its header is kept), else start afresh.
    """

    def __init__(self, filename: str | os.PathLike, separator: str = ",", append: bool = False):
        self.filename, self.separator, self.append = os.fspath(filename), separator, append
        self._file: TextIO | None = None
        self._writer: Any = None

    def on_train_begin(self, logs=None):
        if not self.model.distribute_strategy.is_chief:
            return
        keep = self.append and os.path.exists(self.filename) and os.path.getsize(self.filename) > 0
        self._file = open(self.filename, "a" if keep else "w", newline="")  # closed in on_train_end
        self._keys: list[str] | None = None
        if keep:
            with open(self.filename, newline="") as existing:
                header = next(csv.reader(existing, delimiter=self.separator), None)
            self._keys = header[1:] if header else None

    def on_epoch_end(self, epoch, logs=None):
        if self._file is None:
            return
        logs = dict(logs or {})
        if self._keys is None:
            self._keys = sorted(logs)
            self._writer = csv.writer(self._file, delimiter=self.separator)
            self._writer.writerow(["epoch", *self._keys])
        elif self._writer is None:
            self._writer = csv.writer(self._file, delimiter=self.separator)
        self._writer.writerow([epoch, *(_cell(logs.get(k)) for k in self._keys)])
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file, self._writer = None, None


def _cell(value: Any) -> Any:
    return "NA" if value is None else float(value)
