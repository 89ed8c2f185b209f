"""Rewrites of a rebuilt program's graph that give the same results faster.

``convolution -> relu -> max_pool2d_with_indices`` (the indices unused) becomes one call of
`conv_relu_max_pool`, as `distsave.training.cpu_blocks` does for Sequentials in ``fit``: on a
CPU the convolution runs channels-last, the pooling pools there (vectorised over channels) and
the ReLU runs on the pooled values; the result comes back channels-first. Pooling before the
ReLU gives the same values and gradients (max commutes with a non-decreasing function); only
the convolution's float rounding may differ. A ``relu -> max_pool2d_with_indices`` pair without
a convolution before it is swapped the same way.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from ..training.fast_pool import is_tracing, max_pool2d_with_indices

__all__ = ["conv_relu_max_pool", "fuse_conv_blocks", "relu_max_pool"]

_aten = torch.ops.aten
_CONVOLUTION = _aten.convolution.default
_RELU = _aten.relu.default
_POOLS = (_aten.max_pool2d_with_indices.default, max_pool2d_with_indices)


def relu_max_pool(x: torch.Tensor, *pool: Any) -> torch.Tensor:
    """``max_pool2d_with_indices(relu(x), *pool)[0]``, pooling first."""
    if is_tracing():
        return max_pool2d_with_indices(_aten.relu(x), *pool)[0]
    return _aten.relu(max_pool2d_with_indices(x, *pool)[0]).contiguous()


def conv_relu_max_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any,
                       padding: Any, dilation: Any, transposed: bool, output_padding: Any, groups: int,
                       *pool: Any) -> torch.Tensor:
    """``max_pool2d_with_indices(relu(convolution(x, weight, ...)), *pool)[0]``, channels-last
    on a CPU and pooling first."""
    if x.device.type == "cpu" and x.dim() == 4 and not transposed and not is_tracing():
        x, weight = x.to(memory_format=torch.channels_last), weight.to(memory_format=torch.channels_last)
    y = _aten.convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    return relu_max_pool(y, *pool)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _pooled_values(pool: fx.Node) -> fx.Node | None:
    """The node reading the pooling's values, if nothing reads its indices."""
    values = None
    for user in pool.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None
        if user.args[1] == 0:
            values = user
        elif user.users:
            return None
    return values


def fuse_conv_blocks(graph: fx.Graph) -> int:
    """Rewrite every fusable block of ``graph`` in place; the number rewritten."""
    fused = 0
    for relu in [n for n in graph.nodes if n.op == "call_function" and n.target is _RELU]:
        pool = _only_user(relu)
        if (pool is None or pool.op != "call_function" or pool.target not in _POOLS or pool.kwargs
                or pool.args[0] is not relu):
            continue
        values = _pooled_values(pool)
        if values is None:
            continue
        source = relu.args[0]
        conv = source if (isinstance(source, fx.Node) and source.op == "call_function"
                          and source.target is _CONVOLUTION and not source.kwargs
                          and _only_user(source) is relu) else None
        with graph.inserting_before(values):
            if conv is not None:
                block = graph.call_function(conv_relu_max_pool, (*conv.args, *pool.args[1:]))
            else:
                block = graph.call_function(relu_max_pool, (source, *pool.args[1:]))
        values.replace_all_uses_with(block)
        for node in [*pool.users, pool, relu, *([conv] if conv is not None else [])]:
            graph.erase_node(node)
        fused += 1
    return fused
