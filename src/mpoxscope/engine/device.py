"""Device and precision choice."""

from __future__ import annotations

import contextlib
import platform

import torch

from mpoxscope.errors import MpoxscopeError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MpoxscopeError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MpoxscopeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Mixed precision: fp16/bf16 AMP on CUDA by default, bf16 on CPU on request, else nothing."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else (
            "fp16" if device.type == "cuda" else "fp32")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise MpoxscopeError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_supports_bf16() -> bool:
    """Native bf16 matrix kernels (AVX-512 BF16 or AMX on x86): there bf16 autocast is faster than fp32. Why not
    oneDNN's own ``_is_mkldnn_bf16_supported``: it is true on any AVX-512 CPU, where oneDNN emulates bf16 — on
    such a 2-core Xeon (AVX-512 and VNNI, no BF16) a Lite0 training step took 1.8x as long in bf16 as in fp32."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        native = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(check()) for check in native if check is not None)
    try:  # other CPUs (e.g. aarch64): oneDNN reports the hardware's bf16 instructions
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(device: torch.device, precision: str = "auto", recorded: str | None = None) -> str:
    """``auto``: bf16 on CUDA (fp16 without bf16 support) and on CPUs with native bf16 kernels, else fp32.
    ``recorded``: the precision this training already ran in (an interrupted run being resumed, a run being
    refit); ``auto`` keeps it where the device runs it, so that a run resumed on a machine whose own choice
    differs still ends as an uninterrupted one would."""
    if precision != "auto":
        if precision not in ("fp32", "bf16", "fp16"):
            raise MpoxscopeError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
        return precision
    if device.type == "cuda":
        if recorded in ("fp32", "fp16") or (recorded == "bf16" and torch.cuda.is_bf16_supported()):
            return recorded
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if recorded in ("fp32", "bf16"):
        return recorded
    return "bf16" if cpu_supports_bf16() else "fp32"
