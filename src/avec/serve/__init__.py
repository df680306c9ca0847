"""An OpenAI-compatible HTTP server with per-request steering.

``create_app(engine, api_key=..., model_id=..., limits=...)`` builds the FastAPI app; an
:class:`Engine` owns the model in one worker thread and batches concurrent requests, each row
with its own steering, each failing alone; :class:`Limits` bounds what a request and the server
may use; ``uvicorn_config`` (in :mod:`avec.serve.server`) runs the app with idle-connection
timeouts. Needs the ``serve`` extra (``pip install avec[serve]``).
"""

from __future__ import annotations

import importlib
from typing import Any

# every name is imported on first use (PEP 562), so that `avec serve --help` and
# `from avec.serve.limits import Limits` do not import the engine, torch or fastapi
_HOMES = {"Engine": "engine", "Generation": "engine", "GenerationResult": "engine",
          "LlamaCppEngine": "engine", "ServeError": "errors", "Limits": "limits",
          "ConnectionLimits": "limits", "VectorRegistry": "registry", "create_app": "app"}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'avec.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"avec.serve.{_HOMES[name]}"), name)
