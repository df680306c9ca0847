"""Server engine throughput: 8 concurrent requests with 8 different vectors vs the same 8 one
after another (default model, CPU, 2 threads, greedy, 64 new tokens each).

    .venv/bin/python bench/bench_serve.py [--reps 3]

Measures avec.serve.Engine directly (the HTTP layer adds JSON and a thread hop, not model
work). Writes bench/results/serve.json. Each request's text is checked to be the same in both
modes, so batching changes the speed, not the output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import avec
from avec.data.demo import CONCEPT_PROMPTS, DEMO_PAIRS
from avec.generation.hf import format_prompt
from avec.serve import Engine, Limits, VectorRegistry
from avec.serve.schemas import SteeringSpec

OUT = Path(__file__).resolve().parent / "results" / "serve.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = avec.load_model()
    base = avec.extract(model, DEMO_PAIRS, list(range(6, 18)))
    registry = VectorRegistry(model)
    for k in range(8):  # 8 different vectors: the ocean vector on 8 different single layers
        registry.put(f"v{k}", base.select([6 + k]))
    engine = Engine(model, registry, Limits(max_tokens=args.tokens))
    prompts = [format_prompt(model, p, chat=True)[0] for p in CONCEPT_PROMPTS[:8]]
    specs = [[SteeringSpec(vector=f"v{k}", coef=4.0)] for k in range(8)]

    def sequential() -> list[list[int]]:
        return [engine.submit(p, s, args.tokens).result().tokens for p, s in zip(prompts, specs)]

    def concurrent() -> list[list[int]]:
        futures = [engine.submit(p, s, args.tokens) for p, s in zip(prompts, specs)]
        return [f.result().tokens for f in futures]

    seq_t, con_t, same = [], [], []
    for _ in range(args.reps):  # interleaved
        t0 = time.perf_counter()
        a = sequential()
        seq_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = concurrent()
        con_t.append(time.perf_counter() - t0)
        same.append(sum(x == y for x, y in zip(a, b)))
    tokens = sum(len(t) for t in b)
    res = {"requests": 8, "distinct_vectors": 8, "max_tokens": args.tokens,
           "tokens": tokens, "sequential_s": seq_t, "concurrent_s": con_t,
           "speedup_median": round(statistics.median(s / c for s, c in zip(seq_t, con_t)), 2),
           "concurrent_tokens_per_s": round(tokens / statistics.median(con_t), 1),
           "sequential_tokens_per_s": round(tokens / statistics.median(seq_t), 1),
           "same_text_rows": same, "batches_run": engine.batches_run}
    engine.shutdown()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
