import gzip
import shutil

import pytest
import torch

import distsave
from distsave.data import DatasetFileError
from distsave.data.mnist import BUNDLED_DIR


def test_load_returns_splits_and_info(mnist):
    splits, info = distsave.datasets.load("mnist", with_info=True, as_supervised=True)
    assert info.splits == {"train": 60000, "test": 10000}
    assert info.num_classes == 10
    assert info.features["image"].shape == (1, 28, 28)
    image, label = next(iter(splits["test"]))
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert label.dtype == torch.int64 and int(label) == 7  # the first test digit is a 7


def test_training_pixels_have_the_published_mean(mnist):
    images = next(iter(mnist["train"].batch(60000)))[0].float() / 255
    assert abs(images.mean().item() - 0.1307) < 1e-3


def test_as_supervised_false_gives_dicts():
    test = distsave.datasets.load("mnist", split="test", as_supervised=False)
    element = next(iter(test))
    assert set(element) == {"image", "label"}


def test_data_dir_loads_a_users_copy_and_names_a_corrupted_file(tmp_path):
    for f in BUNDLED_DIR.glob("*.gz"):
        shutil.copy(f, tmp_path)
    assert len(distsave.datasets.load("mnist", split="test", data_dir=tmp_path)) == 10000
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[100] ^= 0xFF
    labels.unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(DatasetFileError, match="t10k-labels-idx1-ubyte.*corrupted"):
        distsave.datasets.load("mnist", data_dir=tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DatasetFileError, match="train-images-idx3-ubyte.*missing"):
        distsave.datasets.load("mnist", data_dir=tmp_path)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar'"):
        distsave.datasets.load("cifar")
    with pytest.raises(ValueError, match="Unknown split"):
        distsave.datasets.load("mnist", split="validation")


def test_split_sizes_answer_to_the_tfds_name():
    _, info = distsave.datasets.load("mnist", with_info=True)
    assert info.splits["train"].num_examples == info.splits["train"] == 60000


def test_one_split_reads_only_its_own_files(tmp_path):
    """The test split loads from a folder holding only its two files (the training files,
    6x larger, are not read: a third of a second of every inference cold start)."""
    for f in BUNDLED_DIR.glob("t10k-*.gz"):
        shutil.copy(f, tmp_path)
    test, info = distsave.datasets.load("mnist", split="test", data_dir=tmp_path, with_info=True)
    assert len(test) == 10000 and info.splits == {"train": 60000, "test": 10000}
    with pytest.raises(DatasetFileError, match="train-images-idx3-ubyte.*missing"):
        distsave.datasets.load("mnist", split="train", data_dir=tmp_path)
