"""An OpenAI-compatible HTTP server with per-request steering.

``create_app(engine, api_key=..., model_id=..., limits=...)`` builds the FastAPI app; an
:class:`Engine` owns the model in one worker thread and batches concurrent requests, each row
with its own steering, each failing alone; :class:`Limits` bounds what a request and the server
may use; ``uvicorn_config`` (in :mod:`avec.serve.server`) runs the app with idle-connection
timeouts. Needs the ``serve`` extra (``pip install avec[serve]``).
"""

from __future__ import annotations

from avec.serve.engine import Engine, Generation, GenerationResult, LlamaCppEngine
from avec.serve.errors import ServeError
from avec.serve.limits import Limits
from avec.serve.registry import VectorRegistry

__all__ = ["Engine", "Generation", "GenerationResult", "Limits", "LlamaCppEngine",
           "ServeError", "VectorRegistry", "create_app"]


def __getattr__(name: str):  # create_app imports fastapi, which the engine does not need
    if name == "create_app":
        from avec.serve.app import create_app

        return create_app
    raise AttributeError(name)
