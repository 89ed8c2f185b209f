"""Max pooling that skips PyTorch's slow CPU kernel for channels-first tensors.

On a CPU, ``max_pool2d`` over an NCHW tensor runs a scalar loop (about 8 ms for the workflow
CNN's 64x32x26x26 activations on one core), while the channels-last kernel is vectorised over
channels (about 0.6 ms). `fast_max_pool2d` transposes into channels-last, pools there and
transposes the (4x smaller) result back; the backward pass runs PyTorch's own NCHW backward
kernel with the indices the forward found (indices count positions inside each H x W plane, so
they are the same in either memory format). Values, indices, tie-breaking (the first maximum
of a window wins) and gradients are those of ``nn.MaxPool2d``.

`FastPooling` is a ``TorchFunctionMode`` that routes every ``F.max_pool2d`` call made inside it
(``nn.MaxPool2d`` modules or functional calls) to `fast_max_pool2d`, so a model is sped up
without being changed. `max_pool2d_with_indices` stands in for the ATen operator of that name
in loaded programs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

__all__ = ["FastPooling", "fast_max_pool2d", "is_tracing", "max_pool2d_with_indices"]

_aten = torch.ops.aten
_CHANNELS_LAST = torch.channels_last


class _MaxPool2d(torch.autograd.Function):
    """Forward on a channels-last copy; backward through the NCHW kernel with the indices."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int],
                dilation: list[int], ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out, indices = _aten.max_pool2d_with_indices(x.contiguous(memory_format=_CHANNELS_LAST),
                                                     kernel, stride, padding, dilation, ceil_mode)
        indices = indices.contiguous()
        ctx.save_for_backward(x, indices)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        ctx.mark_non_differentiable(indices)
        return out.contiguous(), indices

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
        x, indices = ctx.saved_tensors
        grad_x = _aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *ctx.args, indices)
        return grad_x, None, None, None, None, None


def is_tracing() -> bool:
    """Whether torch is recording a program (export, compile): faster equivalents then step
    aside, so the program records the operators as written."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _applies(x: torch.Tensor, return_indices: bool) -> bool:
    """Only where the slow kernel would run: NCHW (or CHW) floating tensors on a CPU, outside
    tracing."""
    return (not return_indices and x.device.type == "cpu" and x.dim() in (3, 4) and not is_tracing()
            and x.is_floating_point() and x.is_contiguous()
            and not x.is_contiguous(memory_format=_CHANNELS_LAST))


def _arguments(kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool) -> tuple:
    kernel = list(_pair(kernel_size))
    return (kernel, list(_pair(stride)) if stride else kernel, list(_pair(padding)),
            list(_pair(dilation)), bool(ceil_mode))


def max_pool2d_with_indices(x: torch.Tensor, kernel_size: Any, stride: Any = (), padding: Any = 0,
                            dilation: Any = 1, ceil_mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten.max_pool2d_with_indices`` (same values, indices and gradient), fast on CPU NCHW."""
    args = _arguments(kernel_size, stride, padding, dilation, ceil_mode)
    if not _applies(x, return_indices=False):
        return _aten.max_pool2d_with_indices(x, *args)
    batched = x if x.dim() == 4 else x.unsqueeze(0)
    out, indices = _MaxPool2d.apply(batched, *args)
    return (out, indices) if x.dim() == 4 else (out.squeeze(0), indices.squeeze(0))


def fast_max_pool2d(x: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
                    dilation: Any = 1, ceil_mode: bool = False) -> torch.Tensor:
    """``F.max_pool2d`` with the same results, computed by the channels-last CPU kernel."""
    if torch.is_grad_enabled() and x.requires_grad:
        return max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)[0]
    args = _arguments(kernel_size, stride, padding, dilation, ceil_mode)
    batched = x if x.dim() == 4 else x.unsqueeze(0)
    out = _aten.max_pool2d(batched.contiguous(memory_format=_CHANNELS_LAST), *args).contiguous()
    return out if x.dim() == 4 else out.squeeze(0)


class FastPooling(TorchFunctionMode):
    """Inside this mode, ``F.max_pool2d`` on CPU channels-first tensors uses `fast_max_pool2d`.

    Example:
        >>> with FastPooling():
        ...     y = torch.nn.MaxPool2d(2)(torch.randn(8, 4, 6, 6))
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.max_pool2d and args and _applies(args[0], kwargs.get("return_indices", False)):
            kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
            return fast_max_pool2d(*args, **kwargs)
        return func(*args, **kwargs)
