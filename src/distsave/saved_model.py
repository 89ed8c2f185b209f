"""`distsave.saved_model`: the low-level API, as ``tf.saved_model`` (save, load, signatures)."""

from .saving.saved_model import (
    DEFAULT_SIGNATURE,
    ConcreteSignature,
    LoadedModel,
    Signature,
    load,
    save,
)

__all__ = ["DEFAULT_SIGNATURE", "ConcreteSignature", "LoadedModel", "Signature", "load", "save"]
