"""Web service: a FastAPI JSON API (``/api/predict``, ``/api/model``, ``/api/health``) and an offline page.

Start it with ``mpoxscope serve RUN`` or build the app in Python with :func:`create_app`. Names are imported
lazily so that ``mpoxscope --help`` does not pay for FastAPI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "mpoxscope.serve.app",
    "create_app_from_predictor": "mpoxscope.serve.app",
    "create_app_from_service": "mpoxscope.serve.app",
    "DEFAULT_ABSTAIN_THRESHOLD": "mpoxscope.serve.service",
    "InferenceService": "mpoxscope.serve.service",
    "ServeConfig": "mpoxscope.serve.service",
    "load_service": "mpoxscope.serve.service",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mpoxscope.serve' has no attribute {name!r}")
