"""A Keras-style model summary: each layer's output shape and parameters, and the totals.

Output shapes come from two calls on zeros of the input spec (batch sizes 1 and 2, in eval mode
without gradients); a dimension that follows the batch size is shown as ``None``. A layer is
listed if it has no sublayers or holds parameters of its own; shared parameters count once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .specs import TensorSpec

__all__ = ["LayerSummary", "count_params", "format_summary", "summarize"]

_WIDTHS = (34, 26, 12)


@dataclass(frozen=True)
class LayerSummary:
    """One row: the layer's qualified name and class, output shape, own parameter count."""

    name: str
    kind: str
    output_shape: str
    params: int


def count_params(module: nn.Module, *, trainable: bool | None = None) -> int:
    """Parameters of ``module`` (each shared tensor once); only (non-)trainable ones if asked."""
    return sum(p.numel() for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


def _shape_text(one: Any, two: Any) -> str:
    if isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor):
        dims = ["None" if a != b else str(a) for a, b in zip(one.shape, two.shape)]
        return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
    if isinstance(one, (tuple, list)) and isinstance(two, (tuple, list)):
        return "[" + ", ".join(_shape_text(a, b) for a, b in zip(one, two)) + "]"
    if isinstance(one, dict) and isinstance(two, dict):
        return "{" + ", ".join(f"{k}: {_shape_text(one[k], two.get(k))}" for k in one) + "}"
    return "?"


def _listed(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules()
            if name and (not m._modules or m._parameters)]


def _output_shapes(module: nn.Module, layers: list[tuple[str, nn.Module]],
                   specs: Sequence[TensorSpec]) -> dict[str, str]:
    seen: list[dict[str, Any]] = [{}, {}]
    device = next(iter([*module.parameters(), *module.buffers()]), torch.zeros(0)).device
    modes = {m: m.training for m in module.modules()}
    for run, batch in enumerate((1, 2)):
        hooks = [m.register_forward_hook(lambda _m, _i, out, name=name, run=run: seen[run].setdefault(name, out))
                 for name, m in layers]
        try:
            with torch.no_grad():
                module.eval()(*[s.example(batch, device) for s in specs])
        finally:
            for hook in hooks:
                hook.remove()
            for m, training in modes.items():
                m.training = training
    return {name: _shape_text(seen[0][name], seen[1].get(name)) for name in seen[0]}


def summarize(module: nn.Module, input_spec: Sequence[TensorSpec] | None = None) -> list[LayerSummary]:
    """One `LayerSummary` per listed layer; shapes are ``?`` when the inputs are unknown."""
    layers = _listed(module)
    shapes = _output_shapes(module, layers, input_spec) if input_spec else {}
    return [LayerSummary(name, type(m).__name__, shapes.get(name, "?"),
                         sum(p.numel() for p in m._parameters.values() if p is not None))
            for name, m in layers]


def format_summary(module: nn.Module, input_spec: Sequence[TensorSpec] | None = None,
                   title: str | None = None) -> str:
    """The summary table as text, as ``keras.Model.summary()`` prints it.

    Example:
        >>> print(format_summary(model, model.input_spec))
    """
    rows = summarize(module, input_spec)
    rule, thick = "_" * sum(_WIDTHS), "=" * sum(_WIDTHS)

    def line(a: str, b: str, c: str) -> str:
        return f"{a:<{_WIDTHS[0]}}{b:<{_WIDTHS[1]}}{c:>{_WIDTHS[2]}}"

    lines = [f'Model: "{title or type(module).__name__}"', rule, line("Layer (type)", "Output Shape", "Param #"),
             thick]
    for i, row in enumerate(rows):
        lines.append(line(f"{row.name} ({row.kind})", row.output_shape, f"{row.params:,}"))
        lines.append(thick if i == len(rows) - 1 else "")
    if not rows:
        lines.append(thick)
    trainable = count_params(module, trainable=True)
    lines += [f"Total params: {count_params(module):,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {count_params(module, trainable=False):,}", rule]
    if not input_spec:
        lines.append("Output shapes are unknown until the model's inputs are (input_spec=, one call, or fit).")
    return "\n".join(lines)
