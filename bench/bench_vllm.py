"""Throughput of avec's steering inside vLLM (issue 20): unsteered vLLM vs every request steered
at one layer vs at all layers, at 8 and 32 concurrent requests of 64 greedy tokens, on the
packaged default model, in vLLM's default compiled mode (and eager with --eager).

Run in the vLLM environment: ``.venv-vllm/bin/python bench/bench_vllm.py`` (``make vllm``).
Writes ``bench/results/vllm.json``. Each configuration runs ``--reps`` times (round robin over the
settings) after one warm-up; the median tokens/s is reported with ratios to unsteered in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "vllm.json"
PROMPTS = ["Tell me a story.", "What should I cook tonight?", "Describe your morning.",
           "Give me advice on my career.", "Explain how rain forms.", "Write a short poem.",
           "What is a good hobby?", "How do I learn to swim?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--eager", action="store_true", help="enforce_eager instead of compiled")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import torch

    from avec.data.demo import DEMO_PAIRS
    from avec.directions.extract import extract
    from avec.models import load_model
    from avec.models.loading import model_directory
    from avec.vllm import EXTRA_ARGS_KEY, VECTORS_ENV

    hf = load_model()
    tmp = tempfile.mkdtemp(prefix="avec-bench-vllm-")
    every = extract(hf, DEMO_PAIRS, layers=list(range(hf.n_layers)))
    every.save(Path(tmp) / "all.safetensors")
    from avec.vector import SteeringVector

    SteeringVector({10: every[10]}, dict(every.metadata)).save(Path(tmp) / "one.safetensors")
    os.environ[VECTORS_ENV] = tmp
    tok = hf.tokenizer
    del hf, every

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model_directory(), dtype="float32", max_model_len=512, seed=0,
              enforce_eager=args.eager)
    start_s = time.perf_counter() - t0
    settings = {"unsteered": None, "one layer": [{"vector": "one", "coef": 4.0}],
                "all layers": [{"vector": "all", "coef": 0.5}]}

    def chat(text: str) -> list[int]:
        s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                    add_generation_prompt=True)
        return list(tok(s, add_special_tokens=False)["input_ids"])

    rows = []
    for n in [int(x) for x in args.concurrency.split(",")]:
        prompts = [{"prompt_token_ids": chat(f"{PROMPTS[i % len(PROMPTS)]} ({i})")}
                   for i in range(n)]
        # every request its own steering entry (same vector, its own coefficient)
        params = {name: [SamplingParams(
            temperature=0.0, max_tokens=args.tokens, ignore_eos=True,
            extra_args=None if entries is None else {EXTRA_ARGS_KEY: json.dumps(
                [{**entries[0], "coef": entries[0]["coef"] * (1 + i / (4 * n))}])})
            for i in range(n)] for name, entries in settings.items()}
        speeds: dict[str, list[float]] = {name: [] for name in settings}
        for name in settings:
            llm.generate(prompts, params[name], use_tqdm=False)  # warm-up
        for _ in range(args.reps):  # round robin: machine drift hits every setting alike
            for name in settings:
                t = time.perf_counter()
                outs = llm.generate(prompts, params[name], use_tqdm=False)
                speeds[name].append(sum(len(o.outputs[0].token_ids) for o in outs)
                                    / (time.perf_counter() - t))
        for name in settings:
            rows.append({"concurrency": n, "setting": name,
                         "tok_s": round(statistics.median(speeds[name]), 1),
                         "runs": [round(s, 1) for s in speeds[name]]})
            print(rows[-1], flush=True)
    for r in rows:
        base = next(x for x in rows if x["concurrency"] == r["concurrency"]
                    and x["setting"] == "unsteered")
        r["ratio_to_unsteered"] = round(r["tok_s"] / base["tok_s"], 3)
    out = {"model": "SmolLM2-135M-Instruct (float32)", "mode": "eager" if args.eager else
           "compiled", "tokens_per_request": args.tokens, "engine_start_s": round(start_s, 1),
           "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
           "load_average": os.getloadavg()[0], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        print(f"{r['concurrency']:>3} concurrent  {r['setting']:<11} {r['tok_s']:>7.1f} tok/s"
              f"  x{r['ratio_to_unsteered']:.3f}")


if __name__ == "__main__":
    main()
