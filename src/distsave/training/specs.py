"""TensorSpec: the shape and dtype a model or signature takes, batch dimension left open."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TensorSpec"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    """Shape (None for any size, usually the batch) and dtype of one input or output.

    Example:
        >>> TensorSpec((None, 1, 28, 28), "float32", name="image").matches(torch.zeros(5, 1, 28, 28))
        True
    """

    shape: tuple[int | None, ...]
    dtype: str = "float32"
    name: str = "x"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in self.shape))
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"Unknown dtype {self.dtype!r} in TensorSpec; use e.g. 'float32'.")

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, name: str = "x") -> TensorSpec:
        return cls((None, *tensor.shape[1:]), _dtype_name(tensor.dtype), name)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def matches(self, tensor: torch.Tensor) -> bool:
        return (tensor.dtype == self.torch_dtype and tensor.ndim == len(self.shape)
                and all(d is None or d == s for d, s in zip(self.shape, tensor.shape)))

    def describe(self) -> str:
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    def example(self, batch: int = 2, device: torch.device | str | None = None) -> torch.Tensor:
        """A zero tensor of this spec, with ``batch`` for every open dimension (on ``meta``, a
        shape without memory)."""
        return torch.zeros([batch if d is None else d for d in self.shape], dtype=self.torch_dtype,
                           device=device)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "name": self.name}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(tuple(data["shape"]), data["dtype"], data.get("name", "x"))


def describe_tensor(tensor: torch.Tensor) -> str:
    return f"{_dtype_name(tensor.dtype)}{list(tensor.shape)}"
