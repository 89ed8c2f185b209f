"""Hand a saved model to other runtimes."""

from .onnx import compare_with_onnxruntime, export_onnx

__all__ = ["compare_with_onnxruntime", "export_onnx"]
