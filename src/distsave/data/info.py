"""What a registered dataset holds: splits, example counts, feature shapes and classes."""

from __future__ import annotations

from dataclasses import dataclass


class SplitInfo(int):
    """A split's example count, with tfds' ``num_examples`` name (it is also the int itself)."""

    @property
    def num_examples(self) -> int:
        return int(self)


@dataclass(frozen=True, kw_only=True)
class FeatureInfo:
    shape: tuple[int, ...]
    dtype: str
    num_classes: int | None = None


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """Metadata returned by `distsave.datasets.load(..., with_info=True)`."""

    name: str
    features: dict[str, FeatureInfo]
    splits: dict[str, int]
    data_dir: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", {k: SplitInfo(v) for k, v in self.splits.items()})

    @property
    def num_examples(self) -> int:
        return sum(self.splits.values())

    @property
    def num_classes(self) -> int | None:
        return next((f.num_classes for f in self.features.values() if f.num_classes), None)
