"""Convolution -> ReLU -> max-pool blocks of a Sequential, run the fast way on a CPU.

Profiled at batch 64 on 2 cores, most of the workflow CNN's step went to its full-size
activation (64x32x26x26): transposes into and out of the channels-last pooling kernel, ReLU
forward and backward over four times the values that survive pooling, and zero-filling the
pooling gradient. Inside `channels_last_blocks`, each ``Conv2d, ReLU, MaxPool2d`` (or
``ReLU, MaxPool2d``) run of a plain ``nn.Sequential`` / `distsave.Sequential` instead:

- convolves channels-last (oneDNN then writes its output channels-last; the weight is copied to
  that layout by a differentiable copy of a few hundred values, so parameters keep theirs),
- max-pools there (the kernel vectorised over channels),
- applies the ReLU to the pooled values, and returns channels-first, as before.

Pooling then ReLU equals ReLU then pooling in values and gradients: max commutes with a
non-decreasing function, the same element wins every window whose maximum is positive, and a
window whose maximum is not positive passes no gradient either way. Only the convolution's
summation order changes (float32 rounding). Modules with hooks, or a Sequential whose forward is
overridden, run as they are.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as module_internals

from .fast_pool import is_tracing

__all__ = ["channels_last_blocks"]

_PLAN = "_distsave_cpu_blocks"  # a Sequential's blocks: [(first layer, layers in the run)], by index


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(module_internals._global_forward_hooks or module_internals._global_forward_pre_hooks
                or module_internals._global_backward_hooks or module_internals._global_backward_pre_hooks)


def _plain_sequential(module: nn.Module) -> bool:
    from .model import Sequential  # model.py imports the training loop, which imports this

    return ((isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward)
            or (isinstance(module, Sequential) and type(module).forward is Sequential.forward))


def _plan(layers: list[nn.Module]) -> list[tuple[int, int]]:
    """Runs to fuse, as (first index, length): ``Conv2d, ReLU, MaxPool2d`` or ``ReLU, MaxPool2d``."""
    def fusable(layer: nn.Module, kind: type) -> bool:
        return type(layer) is kind and not _has_hooks(layer)

    runs, i = [], 0
    while i < len(layers):
        pool_at = i + 2 if fusable(layers[i], nn.Conv2d) else i + 1
        if (pool_at < len(layers) and fusable(layers[pool_at - 1], nn.ReLU)
                and fusable(layers[pool_at], nn.MaxPool2d) and not layers[pool_at].return_indices):
            runs.append((i, pool_at - i + 1))
            i = pool_at + 1
        else:
            i += 1
    return runs


def _block(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """One fused run: [Conv2d,] ReLU, MaxPool2d."""
    conv, pool = (layers[0] if len(layers) == 3 else None), layers[-1]
    if conv is not None:
        if x.dim() == 4 and x.device.type == "cpu":
            x = conv._conv_forward(x.to(memory_format=torch.channels_last),
                                   conv.weight.to(memory_format=torch.channels_last), conv.bias)
        else:
            x = conv(x)
    x = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, ceil_mode=pool.ceil_mode)
    return F.relu(x).contiguous()


def _blocks_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Sequential's forward with its planned runs fused (bound to the Sequential)."""
    layers = list(self._modules.values())
    if is_tracing():
        runs = []  # a program records the layers as written
    else:
        runs = self.__dict__[_PLAN]
    i = 0
    for first, length in runs:
        for layer in layers[i:first]:
            x = layer(x)
        x = _block(layers[first:first + length], x)
        i = first + length
    for layer in layers[i:]:
        x = layer(x)
    return x


@contextlib.contextmanager
def channels_last_blocks(root: nn.Module) -> Iterator[None]:
    """Within this context, the fusable runs of every plain Sequential in ``root`` run fused
    (see the module docstring); each Sequential's own forward is back afterwards.

    The fused forward is bound to each Sequential, so a deep copy made meanwhile runs its own
    layers.
    """
    patched = []
    if not _global_hooks():
        for module in root.modules():
            if "forward" in module.__dict__ or not _plain_sequential(module):
                continue
            runs = _plan(list(module._modules.values()))
            if runs:
                module.__dict__[_PLAN] = runs
                module.forward = types.MethodType(_blocks_forward, module)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
            del module.__dict__[_PLAN]
