"""Saving and loading: the distsave artifact format, high-level and low-level APIs."""

from . import saved_model
from .background import SaveHandle, wait_for_saves
from .errors import ArtifactError, SaveError
from .manifest import read_manifest
from .model_format import load_model, save_model
from .registry import register_serializable

__all__ = ["ArtifactError", "SaveError", "SaveHandle", "load_model", "read_manifest",
           "register_serializable", "save_model", "saved_model", "wait_for_saves"]
