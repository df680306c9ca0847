"""Core benchmark: model load times and the cost of extraction vs the forward passes it needs.

Run with `make bench` (or `.venv/bin/python bench/bench_core.py`). Writes
bench/results/core.json and prints a table. Timings are medians over repetitions on this
machine (CPU, torch threads as configured); they are measurements, never test assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import avec
from avec.directions.activations import pad_batch
from avec.data import load_ab_pairs, pair_texts
from avec.data.demo import DEMO_PAIRS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "results" / "core.json"

LOAD_SNIPPET = ("import time; t0 = time.perf_counter(); import avec; t1 = time.perf_counter(); "
                "m = avec.load_model(); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)")


def fresh_process_load(env: dict[str, str]) -> tuple[float, float]:
    """(seconds for `import avec`, seconds for `avec.load_model()`) in a new interpreter."""
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], env=env, capture_output=True,
                         text=True, check=True)
    imp, load = out.stdout.strip().splitlines()[-1].split()
    return float(imp), float(load)


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"min": round(min(times), 4), "median": round(statistics.median(times), 4),
            "max": round(max(times), 4), "n": len(times)}


def truncated_forward(model: avec.Model, token_lists: list[list[int]], layer: int,
                      batch_size: int) -> None:
    """Reference cost: embeddings + blocks 0..layer, nothing else, on the same batches."""
    inner = model.hf.get_decoder() if hasattr(model.hf, "get_decoder") else model.hf.model
    saved = inner.layers
    inner.layers = torch.nn.ModuleList(list(saved)[: layer + 1])
    try:
        order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                rows = [token_lists[j] for j in order[i:i + batch_size]]
                ids, mask, pos = pad_batch(rows, model.tokenizer.pad_token_id, "right")
                inner(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        inner.layers = saved


def full_forward(model: avec.Model, token_lists: list[list[int]], batch_size: int) -> None:
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            rows = [token_lists[j] for j in order[i:i + batch_size]]
            ids, mask, pos = pad_batch(rows, model.tokenizer.pad_token_id, "right")
            model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)


NINE = [-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0]


def sweep_cost(name: str, data: str, one: Callable[[], object], nine: Callable[[], object],
               reps: int) -> dict[str, object]:
    """Seconds for one coefficient vs nine on the same data, interleaved repetitions."""
    one_t, nine_t = [], []
    for _ in range(reps):
        one_t += timed(one, 1)
        nine_t += timed(nine, 1)
    return {"metric": name, "data": data, "one_coef_s": summary(one_t),
            "nine_coefs_s": summary(nine_t),
            "ratio_nine_over_one": round(statistics.median(nine_t) / statistics.median(one_t), 3)}


def bench_sweeps(model: avec.Model, reps: int) -> list[dict[str, object]]:
    """9 coefficients vs 1 for the A/B metric (the CAA protocol: prefix cache shared by every
    coefficient), KL on neutral prompts and a concept score of greedy completions."""
    from avec.data.demo import CONCEPT_PROMPTS, NEUTRAL_PROMPTS
    from avec.evaluate.ab import ab_sweep, load_ab_items
    from avec.evaluate.side_effects import kl_divergence
    from avec.generation.hf import steered_completions

    items = load_ab_items(DATA / "caa" / "refusal" / "test_dataset_ab.json")
    pairs = load_ab_pairs(DATA / "caa" / "refusal" / "generate_dataset.json")[:64]
    ab_vec = avec.extract(model, pairs, [14], position="ab_letter", chat=True)
    ocean = avec.extract(model, DEMO_PAIRS, [14])
    gen = lambda coefs: steered_completions(model, CONCEPT_PROMPTS, ocean, coefs,  # noqa: E731
                                            max_new_tokens=32)
    return [
        sweep_cost("ab", "caa/refusal/test_dataset_ab.json (50 questions), layer 14",
                   lambda: ab_sweep(model, items, ab_vec, [14], [1.0]),
                   lambda: ab_sweep(model, items, ab_vec, [14], NINE), reps),
        sweep_cost("kl", f"{len(NEUTRAL_PROMPTS)} neutral prompts, last-token KL, layer 14",
                   lambda: kl_divergence(model, NEUTRAL_PROMPTS, ocean, 14, [1.0]),
                   lambda: kl_divergence(model, NEUTRAL_PROMPTS, ocean, 14, NINE), reps),
        sweep_cost("concept generation", f"{len(CONCEPT_PROMPTS)} prompts x 32 greedy tokens, "
                   "layer 14", lambda: gen([1.0]), lambda: gen(NINE), reps),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data", choices=["demo", "caa"], default="demo",
                        help="demo: the built-in short pairs, cycled to --pairs; caa: CAA "
                             "hallucination A/B questions with the chat template (long texts)")
    parser.add_argument("--layer", type=int, default=14)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold (convert) load")
    parser.add_argument("--parts", default="load,extract,sweep",
                        help="comma-separated parts to run (load, extract, sweep); results of "
                             "parts not run are kept from the previous results file")
    args = parser.parse_args()
    parts = {x.strip() for x in args.parts.split(",")}
    unknown = parts - {"load", "extract", "sweep"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; use load, extract, sweep")
    torch.manual_seed(0)
    results: dict[str, object] = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results.update({
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "avec_version": avec.__version__})
    results.pop("ab_sweep", None)  # older layout, replaced by "sweeps"
    if "load" in parts:
        results.update(bench_load(args.skip_cold))
    model = avec.load_model()
    if "extract" in parts:
        results["extraction"] = bench_extraction(model, args)
    if "sweep" in parts:
        results["sweeps"] = bench_sweeps(model, args.reps)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"wrote {OUT}")


def bench_load(skip_cold: bool) -> dict[str, object]:
    env = dict(os.environ)
    fresh_process_load(env)  # make sure the cache exists
    warm = [fresh_process_load(env) for _ in range(3)]
    out: dict[str, object] = {
        "import_avec_fresh_process_s": summary([w[0] for w in warm]),
        "warm_load_model_fresh_process_s": summary([w[1] for w in warm]),
        "warm_load_model_again_in_process_s": summary(timed(avec.load_model, 3))}
    if not skip_cold:
        with tempfile.TemporaryDirectory() as tmp:
            out["cold_load_model_fresh_process_s"] = summary(
                [fresh_process_load({**env, "AVEC_CACHE": tmp})[1]])
    return out


def bench_extraction(model: avec.Model, args: argparse.Namespace) -> dict[str, object]:
    if args.data == "caa":
        source = DATA / "caa" / "hallucination" / "generate_dataset.json"
        pairs = load_ab_pairs(source)[: args.pairs]
        chat, position = True, "ab_letter"
        described = (f"{source.relative_to(DATA.parent)} first {len(pairs)} A/B pairs, chat "
                     f"template, read at the answer letter")
    else:
        pairs = [DEMO_PAIRS[i % len(DEMO_PAIRS)] for i in range(args.pairs)]
        chat, position = False, "last"
        described = f"avec's {len(DEMO_PAIRS)} demo pairs cycled to {len(pairs)}, last token"
    pos, neg = pair_texts(pairs, model, chat=chat)
    texts = pos + neg
    tokens = model.encode(texts)
    L = args.layer
    extract_t, ref_t, full_t = [], [], []
    for _ in range(args.reps):  # interleaved repetitions
        extract_t += timed(lambda: avec.extract(model, pairs, [L], position=position,
                                                chat=chat), 1)
        ref_t += timed(lambda: truncated_forward(model, tokens, L, 32), 1)
        full_t += timed(lambda: full_forward(model, tokens, 32), 1)
    return {
        "data": described, "pairs": len(pairs),
        "texts": len(texts), "tokens": sum(len(t) for t in tokens), "layer": L,
        "avec_extract_s": summary(extract_t),
        "forward_to_layer_s": summary(ref_t),
        "full_forward_s": summary(full_t),
        "ratio_extract_over_forward_to_layer": round(
            statistics.median(extract_t) / statistics.median(ref_t), 3),
        "ratio_extract_over_full_forward": round(
            statistics.median(extract_t) / statistics.median(full_t), 3),
    }


def print_table(results: dict[str, object]) -> None:
    print(f"{'measurement':<52} {'median':>10}")
    for key in ("import_avec_fresh_process_s", "warm_load_model_fresh_process_s",
                "warm_load_model_again_in_process_s", "cold_load_model_fresh_process_s"):
        if key in results:
            print(f"{key:<52} {results[key]['median']:>9.3f}s")  # type: ignore[index]
    ex = results.get("extraction")
    if isinstance(ex, dict):
        tag = f" ({ex.get('pairs', '?')} pairs, L{ex['layer']})"
        for key in ("avec_extract_s", "forward_to_layer_s", "full_forward_s"):
            print(f"{key + tag:<52} {ex[key]['median']:>9.3f}s")
        print(f"{'extract / forward-to-layer':<52} {ex['ratio_extract_over_forward_to_layer']:>10}")
        print(f"{'extract / full forward':<52} {ex['ratio_extract_over_full_forward']:>10}")
    for sw in results.get("sweeps", []):  # type: ignore[union-attr]
        name = sw["metric"]
        print(f"{name + ', 1 coefficient':<52} {sw['one_coef_s']['median']:>9.3f}s")
        print(f"{name + ', 9 coefficients':<52} {sw['nine_coefs_s']['median']:>9.3f}s")
        print(f"{name + ', 9 / 1 coefficients':<52} {sw['ratio_nine_over_one']:>10}")


if __name__ == "__main__":
    main()
