"""An OpenAI-compatible HTTP server with per-request steering (first slice).

``create_app(engine, api_key=..., model_id=..., limits=...)`` builds the FastAPI app; an
:class:`Engine` owns the model in one worker thread and batches concurrent requests, each row
with its own steering. Needs the ``serve`` extra (``pip install avec[serve]``).
"""

from __future__ import annotations

from avec.serve.engine import Engine, GenerationResult, Limits, LlamaCppEngine
from avec.serve.registry import VectorRegistry

__all__ = ["Engine", "GenerationResult", "Limits", "LlamaCppEngine", "VectorRegistry",
           "create_app"]


def __getattr__(name: str):  # create_app imports fastapi, which the engine does not need
    if name == "create_app":
        from avec.serve.app import create_app

        return create_app
    raise AttributeError(name)
