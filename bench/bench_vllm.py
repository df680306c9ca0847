"""Throughput of avec's steering inside vLLM (issue 20), on the packaged default model, at 8 and
32 concurrent requests of 64 greedy tokens:

1. vLLM offline (``vllm.LLM``) with avec's plugin: unsteered vs every request steered (its own
   coefficient) at one layer vs at all layers, in vLLM's default compiled mode (``--eager``:
   eager); ratios to unsteered in the same run.
2. avec's server engines on the same load, every request steered at one layer through
   ``Engine.submit``: ``avec serve --backend vllm`` (:class:`avec.vllm.engine.VLLMEngine`,
   compiled) vs ``avec serve``'s HF engine (static batches of up to 32); the ratio vLLM / HF.

Run in the vLLM environment: ``.venv-vllm/bin/python bench/bench_vllm.py`` (``make vllm``).
Writes ``bench/results/vllm.json``. Each configuration runs ``--reps`` times (round robin over the
settings where they share an engine) after one warm-up; medians are reported.
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
    ap.add_argument("--reserved-cpus", default=None,
                    help="VLLM_CPU_NUM_OF_RESERVED_CPU for every vLLM engine here (default: "
                         "avec's rule, 0 on machines with at most 4 CPUs, else vLLM's own)")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--skip-engines", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from avec.vllm import RESERVED_CPU_ENV, use_all_cpus_on_small_machines

    if args.reserved_cpus is not None:
        os.environ[RESERVED_CPU_ENV] = str(args.reserved_cpus)
    use_all_cpus_on_small_machines()

    import torch

    from avec.models import load_model

    hf = load_model()
    out: dict = {"model": "SmolLM2-135M-Instruct (float32)", "tokens_per_request": args.tokens,
                 "date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(),
                 "cpus": os.cpu_count(), "cpu": _cpu_name(),
                 RESERVED_CPU_ENV: os.environ.get(RESERVED_CPU_ENV, "vLLM's default")}
    if not args.skip_offline:
        out["offline"] = bench_offline(args, hf)
    if not args.skip_engines:
        out["engines"] = bench_engines(args, hf)
    out["load_average"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def chat_ids(tok, text: str) -> list[int]:
    s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                add_generation_prompt=True)
    return list(tok(s, add_special_tokens=False)["input_ids"])


def bench_offline(args, hf) -> dict:
    """vLLM's LLM with the plugin: unsteered vs one layer vs all layers."""
    import torch  # noqa: F401

    from avec.data.demo import DEMO_PAIRS
    from avec.directions.extract import extract
    from avec.models.loading import model_directory
    from avec.vllm import EXTRA_ARGS_KEY, VECTORS_ENV

    tmp = tempfile.mkdtemp(prefix="avec-bench-vllm-")
    every = extract(hf, DEMO_PAIRS, layers=list(range(hf.n_layers)))
    every.save(Path(tmp) / "all.safetensors")
    from avec.vector import SteeringVector

    SteeringVector({10: every[10]}, dict(every.metadata)).save(Path(tmp) / "one.safetensors")
    os.environ[VECTORS_ENV] = tmp
    tok = hf.tokenizer
    del every

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model_directory(), dtype="float32", max_model_len=512, seed=0,
              enforce_eager=args.eager)
    start_s = time.perf_counter() - t0
    settings = {"unsteered": None, "one layer": [{"vector": "one", "coef": 4.0}],
                "all layers": [{"vector": "all", "coef": 0.5}]}

    rows = []
    for n in [int(x) for x in args.concurrency.split(",")]:
        prompts = [{"prompt_token_ids": chat_ids(tok, f"{PROMPTS[i % len(PROMPTS)]} ({i})")}
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
    llm.llm_engine.engine_core.shutdown()
    for r in rows:
        print(f"{r['concurrency']:>3} concurrent  {r['setting']:<11} {r['tok_s']:>7.1f} tok/s"
              f"  x{r['ratio_to_unsteered']:.3f}", flush=True)
    return {"mode": "eager" if args.eager else "compiled", "engine_start_s": round(start_s, 1),
            "rows": rows}


def bench_engines(args, hf) -> dict:
    """avec's server engines, every request steered at one layer with its own coefficient:
    the vLLM engine (compiled) vs the HF engine, on the same requests."""
    from concurrent.futures import wait

    from avec.data.demo import DEMO_PAIRS
    from avec.directions.extract import extract
    from avec.models.loading import model_directory
    from avec.serve import Engine, Limits, VectorRegistry
    from avec.serve.schemas import SteeringSpec
    from avec.vector import SteeringVector
    from avec.vllm.engine import VLLMEngine, VLLMModel

    sizes = [int(x) for x in args.concurrency.split(",")]
    limits = Limits(max_tokens=args.tokens, max_batch=max(sizes), max_queue=max(sizes))
    vec = extract(hf, DEMO_PAIRS, layers=[10])
    prompts = {n: [chat_ids(hf.tokenizer, f"{PROMPTS[i % len(PROMPTS)]} ({i})")
                   for i in range(n)] for n in sizes}

    def load(engine, n: int) -> float:
        t = time.perf_counter()
        futures = [engine.submit(ids, [SteeringSpec(vector="v", coef=4.0 * (1 + i / (4 * n)))],
                                 args.tokens) for i, ids in enumerate(prompts[n])]
        wait(futures)
        tokens = sum(len(f.result().tokens) for f in futures)
        return tokens / (time.perf_counter() - t)

    def measure(engine) -> dict[int, list[float]]:
        speeds: dict[int, list[float]] = {n: [] for n in sizes}
        for n in sizes:
            load(engine, n)  # warm-up
        for _ in range(args.reps):
            for n in sizes:
                speeds[n].append(load(engine, n))
        return speeds

    results = {}
    directory = model_directory()
    model = VLLMModel(directory)
    registry = VectorRegistry(model)
    registry.put("v", SteeringVector({10: vec[10]}))
    t0 = time.perf_counter()
    engine = VLLMEngine(directory, registry, limits, model=model, enforce_eager=args.eager,
                        max_model_len=512)
    start_s = time.perf_counter() - t0
    results["avec serve --backend vllm"] = measure(engine)
    engine.shutdown()
    registry = VectorRegistry(hf)
    registry.put("v", SteeringVector({10: vec[10]}))
    engine = Engine(hf, registry, limits)
    results["avec serve (hf)"] = measure(engine)
    engine.shutdown()
    rows = []
    for n in sizes:
        base = statistics.median(results["avec serve (hf)"][n])
        for name, speeds in results.items():
            med = statistics.median(speeds[n])
            rows.append({"concurrency": n, "engine": name, "tok_s": round(med, 1),
                         "runs": [round(x, 1) for x in speeds[n]],
                         "ratio_to_hf_engine": round(med / base, 2)})
            print(f"{n:>3} concurrent  {name:<26} {med:>7.1f} tok/s  x{med / base:.2f} vs HF "
                  f"engine", flush=True)
    return {"mode": "eager" if args.eager else "compiled", "vllm_engine_start_s":
            round(start_s, 1), "steering": "every request its own coefficient, 1 layer",
            "rows": rows}


if __name__ == "__main__":
    main()
