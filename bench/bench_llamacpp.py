"""The llama.cpp backend against the HF backend on the default model (CPU, 2 threads).

    .venv/bin/python bench/bench_llamacpp.py [--reps 3] [--tokens 64]

Speed: batch-1 greedy generation of exactly ``--tokens`` new tokens (end-of-sequence
suppressed) per prompt, unsteered and steered (ocean vector, layer 14, coef 4), tokens per
second, interleaved rounds, median. Agreement: on the same prompts, teacher-forced greedy
agreement of llama.cpp with HF's steered continuation (the fraction of steps where both pick
the same next token on the same prefix), with the vector at its own layer and, as controls,
moved one layer down or up and left out; plus the length of the common prefix of the
free-running greedy texts. Writes bench/results/llamacpp.json (or ``--out``), with the
instruction sets the installed llama.cpp was built for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import avec
from avec.generation.llamacpp import ControlTerm, LlamaCppModel
from avec.data.demo import CONCEPT_PROMPTS, DEMO_PAIRS
from avec.generation.hf import format_prompt, generate_ids
from avec.vector import SteeringVector

OUT = Path(__file__).resolve().parent / "results" / "llamacpp.json"
LAYER, COEF = 14, 4.0


def system_info() -> str:
    """The instruction sets this llama.cpp build was compiled for (``AVX2 = 1 | ...``)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT, help=f"result file ({OUT.name})")
    parser.add_argument("--llama-only", action="store_true",
                        help="time llama.cpp alone (no HF runs, no agreement): to compare "
                             "llama.cpp builds")
    args = parser.parse_args()
    torch.set_num_threads(2)
    hf = avec.load_model()
    lc = LlamaCppModel.load(n_threads=2)
    vec = avec.extract(hf, DEMO_PAIRS, [LAYER])
    prompts = [format_prompt(hf, p)[0] for p in CONCEPT_PROMPTS[:8]]
    n = args.tokens

    def run_hf(steered: bool) -> float:
        t0 = time.perf_counter()
        for ids in prompts:
            if steered:
                with avec.steer(hf, vec, coef=COEF):
                    generate_ids(hf, [ids], n, min_new_tokens=n)
            else:
                generate_ids(hf, [ids], n, min_new_tokens=n)
        return len(prompts) * n / (time.perf_counter() - t0)

    def run_lc(steered: bool) -> float:
        terms = [ControlTerm(vec, COEF)] if steered else []
        t0 = time.perf_counter()
        for ids in prompts:
            lc.generate(ids, n, terms, min_new_tokens=n)
        return len(prompts) * n / (time.perf_counter() - t0)

    speed: dict[str, list[float]] = {k: [] for k in ("hf", "hf_steered", "llama.cpp",
                                                     "llama.cpp_steered")}
    for _ in range(args.reps):
        if not args.llama_only:
            speed["hf"].append(run_hf(False))
        speed["llama.cpp"].append(run_lc(False))
        if not args.llama_only:
            speed["hf_steered"].append(run_hf(True))
        speed["llama.cpp_steered"].append(run_lc(True))
    tok_s = {k: round(statistics.median(v), 1) for k, v in speed.items() if v}
    if args.llama_only:
        write(args.out, {"model": hf.name, "prompts": len(prompts), "new_tokens": n,
                         "rounds": args.reps, "layer": LAYER, "coef": COEF,
                         "tokens_per_second": tok_s, "all_rounds": speed,
                         "llama_cpp_system_info": system_info(),
                         "date": time.strftime("%Y-%m-%d")})
        return

    variants = {"own layer": [ControlTerm(vec, COEF)],
                "layer - 1": [ControlTerm(SteeringVector({LAYER - 1: vec[LAYER]}), COEF)],
                "layer + 1": [ControlTerm(SteeringVector({LAYER + 1: vec[LAYER]}), COEF)],
                "unsteered": []}
    agree: dict[str, list[float]] = {k: [] for k in variants}
    prefix = []
    for ids in prompts:
        with avec.steer(hf, vec, coef=COEF):
            ref = generate_ids(hf, [ids], 32)[0]
        for name, terms in variants.items():
            forced = lc.logits_along(ids, ref, terms).argmax(-1)
            agree[name].append(float(np.mean(forced == np.array(ref))))
        free = lc.generate(ids, 32, variants["own layer"])
        prefix.append(next((i for i, (a, b) in enumerate(zip(free, ref)) if a != b),
                           min(len(free), len(ref))))
    result = {
        "model": hf.name, "prompts": len(prompts), "new_tokens": n, "rounds": args.reps,
        "layer": LAYER, "coef": COEF, "tokens_per_second": tok_s,
        "speedup": {"unsteered": round(tok_s["llama.cpp"] / tok_s["hf"], 2),
                    "steered": round(tok_s["llama.cpp_steered"] / tok_s["hf_steered"], 2)},
        "teacher_forced_agreement": {k: round(float(np.mean(v)), 3) for k, v in agree.items()},
        "free_running_common_prefix": {"mean": round(float(np.mean(prefix)), 1),
                                       "per_prompt": prefix, "of": 32},
        "llama_cpp_system_info": system_info(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write(args.out, result)


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
