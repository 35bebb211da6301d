"""Export a trained run for deployment: ONNX graph + ONNX Runtime predictor with the run's preprocessing.

Names are imported lazily so that ``mpoxscope --help`` (which imports :mod:`mpoxscope.export.cli`) does
not load torch and onnxruntime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ONNX_FILE", "ExportReport", "OnnxPredictor", "export_onnx"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mpoxscope.export import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
