"""Bad input gets an error that names the problem and the fix."""

import pytest
import torch

from tests.conftest import cnn_model, tiny_model

import distsave
from distsave.data import Dataset


def images(n=8, dtype=torch.float32, shape=(1, 28, 28)):
    return torch.zeros(n, *shape, dtype=dtype)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "hinge_squared", "optimizer": "adam"}, "Unknown loss 'hinge_squared'"),
    ({"loss": "mse", "optimizer": "adamm"}, "Unknown optimizer 'adamm'"),
    ({"loss": "mse", "optimizer": "adam", "metrics": ["f1"]}, "Unknown metric 'f1'"),
    ({"loss": "mse", "optimizer": "adam", "metrics": ["accuracy"]}, "Cannot tell which accuracy"),
])
def test_unknown_names(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().compile(**kwargs)


def test_float_labels_for_sparse_crossentropy():
    data = Dataset.from_tensor_slices((images(), torch.zeros(8))).batch(4)
    with pytest.raises(TypeError, match=r"integer class labels.*float32.*\.long\(\)"):
        cnn_model().fit(data, verbose=0)


def test_wrong_image_shape_names_the_shape():
    data = Dataset.from_tensor_slices((images(shape=(28, 28)), torch.zeros(8, dtype=torch.long))).batch(4)
    with pytest.raises(ValueError, match=r"float32\[4, 28, 28\].*\[batch, 1, 28, 28\]"):
        cnn_model().fit(data, verbose=0)


def test_unscaled_uint8_images_are_explained():
    data = Dataset.from_tensor_slices((images(dtype=torch.uint8), torch.zeros(8, dtype=torch.long))).batch(4)
    with pytest.raises(ValueError, match=r"uint8\[4, 1, 28, 28\].*dataset's map"):
        cnn_model().fit(data, verbose=0)


def test_dataset_of_dicts_is_explained():
    data = distsave.datasets.load("mnist", split="test", as_supervised=False).take(8).batch(4)
    with pytest.raises(TypeError, match=r"\(inputs, labels\) pairs.*dict with keys \['image', 'label'\].*as_supervised=True"):
        cnn_model().fit(data, verbose=0)


def test_fit_before_compile():
    with pytest.raises(RuntimeError, match="compile"):
        distsave.Sequential([torch.nn.Linear(2, 2)]).fit(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
