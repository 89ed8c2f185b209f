"""MNIST from its four original IDX files, bundled with distsave and checked on every load."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch

from .dataset import Dataset
from .info import DatasetInfo, FeatureInfo

__all__ = ["BUNDLED_DIR", "SPLIT_SIZES", "load_mnist"]

BUNDLED_DIR = Path(__file__).parent / "mnist"

# md5 of the decompressed files, as published with the original distribution.
_FILES = {
    "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
    "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 0x803, 0x801


class DatasetFileError(ValueError):
    """A dataset file is missing, corrupted or not in the expected format."""


def _read_checked(data_dir: Path, name: str, md5: str) -> bytes:
    for candidate, opener in ((data_dir / name, open), (data_dir / f"{name}.gz", gzip.open)):
        if candidate.is_file():
            try:
                with opener(candidate, "rb") as f:
                    raw = f.read()
            except (OSError, EOFError) as error:
                raise DatasetFileError(
                    f"Could not read MNIST file {candidate}: {error}. Replace it with the "
                    "original file (see the md5 list in distsave/data/mnist/README.md)."
                ) from error
            if hashlib.md5(raw).hexdigest() != md5:
                raise DatasetFileError(
                    f"MNIST file {candidate} is corrupted: its content's md5 is "
                    f"{hashlib.md5(raw).hexdigest()}, expected {md5}. Replace it with the "
                    "original file."
                )
            return raw
    raise DatasetFileError(
        f"MNIST file {name} (or {name}.gz) is missing from {data_dir}. Pass data_dir= a folder "
        "holding the four original IDX files, or leave data_dir unset to use the bundled copy."
    )


def _parse_idx(raw: bytes, magic: int, item_dims: int) -> np.ndarray:
    header = np.frombuffer(raw, dtype=">u4", count=1 + item_dims)
    if header[0] != magic:
        raise DatasetFileError(f"Expected IDX magic {magic:#x}, found {int(header[0]):#x}.")
    shape = tuple(int(d) for d in header[1:])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 * len(header)).reshape(shape)


# Examples per split of the original files (which the md5s pin down).
SPLIT_SIZES = {"train": 60000, "test": 10000}


def load_mnist(data_dir: str | Path | None = None,
               splits: tuple[str, ...] = tuple(SPLIT_SIZES)) -> tuple[dict[str, Dataset], DatasetInfo]:
    """Load MNIST as ``(image uint8 [1, 28, 28], label int64)`` elements, for the ``splits``
    asked for (only their files are read: the training files are 6x the test files)."""
    folder = Path(data_dir) if data_dir is not None else BUNDLED_DIR
    loaded = {}
    for split in splits:
        images = _parse_idx(_read_checked(folder, *_FILES[f"{split}_images"]), _IMAGE_MAGIC, 3)
        labels = _parse_idx(_read_checked(folder, *_FILES[f"{split}_labels"]), _LABEL_MAGIC, 1)
        loaded[split] = Dataset.from_tensor_slices(
            (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
        )
    info = DatasetInfo(
        name="mnist",
        features={
            "image": FeatureInfo(shape=(1, 28, 28), dtype="uint8"),
            "label": FeatureInfo(shape=(), dtype="int64", num_classes=10),
        },
        splits=dict(SPLIT_SIZES),
        data_dir=str(folder),
    )
    return loaded, info
