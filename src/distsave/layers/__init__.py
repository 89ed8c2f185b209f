"""Layers built from saved artifacts."""

from .saved_model_layer import SavedModelLayer

__all__ = ["SavedModelLayer"]
