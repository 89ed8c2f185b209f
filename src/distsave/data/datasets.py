"""`distsave.datasets.load`: named datasets, offline, in the shape of `tfds.load`."""

from __future__ import annotations

from pathlib import Path

from .dataset import Dataset
from .mnist import SPLIT_SIZES, load_mnist

__all__ = ["load"]

_REGISTRY = {"mnist": (load_mnist, SPLIT_SIZES)}  # loader(data_dir, splits), split names


def load(
    name: str,
    *,
    split: str | None = None,
    with_info: bool = False,
    as_supervised: bool = True,
    data_dir: str | Path | None = None,
) -> Dataset | dict[str, Dataset] | tuple:
    """Load a bundled dataset by name.

    Args:
        name: A registered dataset name (``"mnist"``).
        split: ``"train"`` or ``"test"`` for one split; None for a dict of all splits.
        with_info: Also return a `DatasetInfo`.
        as_supervised: Elements are ``(input, label)`` tuples; when False, dicts
            ``{"image": ..., "label": ...}``.
        data_dir: A folder with the dataset's original files; default: the bundled copy.

    Returns:
        The split(s), and the info when ``with_info``.

    Raises:
        ValueError: unknown name or split; a missing or corrupted file (named).

    Example:
        >>> datasets, info = load("mnist", with_info=True, as_supervised=True)
        >>> info.splits["train"]
        60000
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown dataset {name!r}. Available: {sorted(_REGISTRY)}.")
    loader, known = _REGISTRY[name]
    if split is not None and split not in known:
        raise ValueError(f"Unknown split {split!r} for {name!r}. Available: {sorted(known)}.")
    splits, info = loader(data_dir, tuple(known) if split is None else (split,))
    if not as_supervised:
        splits = {k: ds.map(lambda image, label: {"image": image, "label": label})
                  for k, ds in splits.items()}
    if split is not None:
        splits = splits[split]
    return (splits, info) if with_info else splits
