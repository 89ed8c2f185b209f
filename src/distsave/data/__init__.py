"""Input pipelines and bundled datasets."""

from . import datasets
from .dataset import Dataset, Table
from .info import DatasetInfo, FeatureInfo, SplitInfo
from .mnist import DatasetFileError

__all__ = ["Dataset", "DatasetFileError", "DatasetInfo", "FeatureInfo", "SplitInfo", "Table", "datasets"]
