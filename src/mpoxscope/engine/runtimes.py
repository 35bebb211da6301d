"""The built-in runtimes (see :data:`mpoxscope.registry.RUNTIMES`) and the one entry point that loads a run
with any of them. A loader imports its libraries only when called, so listing runtimes stays cheap."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mpoxscope.errors import MpoxscopeError
from mpoxscope.registry import RUNTIMES, register_runtime


def load_predictor(run_dir: str | os.PathLike, runtime: str = "torch", device: str = "auto",
                   onnx_file: str | os.PathLike | None = None) -> Any:
    """Run ``run_dir`` with ``runtime`` (a name in :data:`RUNTIMES`); ``onnx_file``: an exported file other
    than the runtime's default (e.g. the int8 one)."""
    spec = RUNTIMES.get(runtime)
    if onnx_file is not None and not spec.takes_file:
        raise MpoxscopeError(f"--onnx: runtime {spec.name!r} does not read an ONNX file")
    return spec.load(Path(run_dir), device, None if onnx_file is None else Path(onnx_file))


def _onnx_predictor_class(runtime: str) -> Any:
    try:
        from mpoxscope.export.onnx import OnnxPredictor
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("mpoxscope"):
            raise MpoxscopeError(f"--runtime {runtime}: the ONNX export module is not installed; "
                                 f"use --runtime torch") from None
        raise
    return OnnxPredictor


def _onnx(run_dir: Path, onnx_file: Path | None, runtime: str) -> Any:
    cls = _onnx_predictor_class(runtime)
    # The default file is exported when missing or stale; an explicit one must match the run's weights.
    return cls.from_run(run_dir, onnx_file=onnx_file) if onnx_file else cls.from_run(run_dir)


@register_runtime("torch", "PyTorch (the trained model itself; heat-maps use it directly)", explainable=True)
def _torch(run_dir: Path, device: str, onnx_file: Path | None) -> Any:
    from mpoxscope.engine.predict import Predictor

    return Predictor.from_run(run_dir, device=device)


@register_runtime("onnx", "ONNX Runtime on RUN/model.onnx (exported when missing or stale) or --onnx FILE",
                  takes_file=True)
def _onnx_runtime(run_dir: Path, device: str, onnx_file: Path | None) -> Any:
    return _onnx(run_dir, onnx_file, "onnx")


@register_runtime("onnx-int8", "ONNX Runtime on the int8 file 'mpoxscope export --quantize int8' wrote "
                               "(RUN/model.int8.onnx, or --onnx FILE)", takes_file=True)
def _onnx_int8(run_dir: Path, device: str, onnx_file: Path | None) -> Any:
    from mpoxscope.engine.rundir import INT8

    path = onnx_file or run_dir / INT8
    if not path.is_file():
        raise MpoxscopeError(f"{path}: int8 file not found; create it with 'mpoxscope export {run_dir} "
                             f"--quantize int8'")
    return _onnx(run_dir, path, "onnx-int8")


@register_runtime("onnx-lite", "ONNX Runtime with Pillow + numpy preprocessing: no torch on the request path "
                               "(serve only)", batch=False, takes_file=True)
def _onnx_lite(run_dir: Path, device: str, onnx_file: Path | None) -> Any:
    from mpoxscope.engine.checkpoint import read_meta
    from mpoxscope.export.lite import LiteOnnxPredictor

    checked = _onnx(run_dir, onnx_file, "onnx-lite")  # exports when missing, refuses a file of other weights
    threads = checked.session.get_session_options().intra_op_num_threads
    return LiteOnnxPredictor(checked.onnx_file, threads=threads, meta=read_meta(run_dir))


__all__ = ["RUNTIMES", "load_predictor"]
