"""Errors raised when writing or reading artifacts."""

__all__ = ["ArtifactError", "SaveError"]


class ArtifactError(ValueError):
    """An artifact is missing, corrupted, hostile or not one distsave can read."""


class SaveError(ValueError):
    """A model cannot be saved as asked; nothing was written."""
