"""Offline batches through vLLM with avec's plugin: ``avec generate --backend vllm``.

Every (prompt, coefficient) pair becomes one request of a single vLLM batch, each with its own
steering entry, so vLLM's continuous batching runs them together; coefficient 0 is a plain
request (no steering at all). Greedy, stopping at end of sequence like the HF backend.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

from avec.generation.hf import Completion, format_prompt
from avec.intervene.conditions import Condition, renamed, to_spec
from avec.models.model import Model
from avec.vector import SteeringVector
from avec.vllm import EXTRA_ARGS_KEY
from avec.vllm.store import check_flat, vectors_from

VECTOR_NAME = "generate"


def steered_completions(model: Model, model_dir: str, prompts: Sequence[str],
                        vector: SteeringVector | None, coefs: Sequence[float], *,
                        layers: Sequence[int] | None = None, positions: str | int = "all",
                        op: str = "add", value: float = 0.0, max_new_tokens: int = 64,
                        chat: bool | None = None, enforce_eager: bool = True,
                        when: Condition | None = None,
                        condition_vectors: dict[str, SteeringVector] | None = None,
                        **llm_kwargs: Any) -> list[Completion]:
    """Greedy completions of every prompt at every coefficient, in (prompt, coef) order, as
    :func:`avec.generation.hf.steered_completions` returns them. ``model`` gives the tokenizer
    and chat template; ``model_dir`` is what vLLM loads
    (:func:`avec.models.loading.model_directory`). ``when`` makes the steering conditional
    (decided on each prompt); ``condition_vectors`` are its leaves' vectors by name."""
    from vllm import LLM, SamplingParams

    if vector is None and any(c != 0 for c in coefs):
        raise ValueError("a nonzero coefficient needs a vector")
    if vector is not None:
        check_flat(vector, "the vector")
    ids = [format_prompt(model, p, chat)[0] for p in prompts]
    with tempfile.TemporaryDirectory(prefix="avec-vllm-generate-") as tmp, vectors_from(tmp):
        if vector is not None:
            vector.save(Path(tmp) / f"{VECTOR_NAME}.safetensors")
        names = {name: f"condition{i}" for i, name in enumerate(condition_vectors or {})}
        for name, vec in (condition_vectors or {}).items():
            vec.save(Path(tmp) / f"{names[name]}.safetensors")
        spec = renamed(to_spec(when), names) if when is not None else None
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=enforce_eager, **llm_kwargs)
        jobs = [(i, c) for i in range(len(prompts)) for c in coefs]
        params = [SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                 extra_args=_entries(c, layers, positions, op, value, spec))
                  for _, c in jobs]
        outs = llm.generate([{"prompt_token_ids": ids[i]} for i, _ in jobs], params)
    return [Completion(prompts[i], float(c), o.outputs[0].text) for (i, c), o in zip(jobs, outs)]


def _entries(coef: float, layers: Sequence[int] | None, positions: str | int, op: str,
             value: float, when: dict[str, Any] | None = None) -> dict[str, str] | None:
    if coef == 0:
        return None
    entry: dict[str, Any] = {"vector": VECTOR_NAME, "coef": float(coef), "op": op,
                             "value": float(value)}
    if when is not None:
        entry["when"] = when
    else:
        entry["positions"] = positions
    if layers:
        entry["layers"] = [int(L) for L in layers]
    return {EXTRA_ARGS_KEY: json.dumps([entry])}
