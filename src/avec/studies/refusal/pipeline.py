"""The whole refusal study from scratch, one call: safety fine-tuning of the default model
(``smollm2-refuses``), direction selection, weight orthogonalization and the evaluation table.

Every step writes into ``out_dir``: ``sft.jsonl`` (the fine-tuning set), ``smollm2-refuses/``
(an ordinary HF model directory), ``select/`` (direction, candidate table, heatmap),
``smollm2-refuses-orthogonalized/`` (plain HF directory), ``eval/`` (JSON and markdown table)
and ``summary.json`` (settings, timings).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from avec.report import write_json

DATA_FILES = ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "harmful_test",
              "harmless_test")


@dataclass
class StudySettings:
    """Sizes of each step (the defaults fit a 2-core CPU in well under an hour)."""

    data_dir: str
    n_harmful_train: int = 260
    n_harmless_train: int = 260
    distil_tokens: int = 64
    epochs: int = 2
    lora_rank: int = 16
    learning_rate: float | None = None
    n_select_train: int = 128
    n_select_val: int = 16
    kl_max: float = 0.1
    fallback_kl_max: float | None = 1.0  # SmolLM2-135M: every candidate has KL > 0.1
    n_eval: int = 64
    eval_tokens: int = 32
    seed: int = 0


def _log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def run_study(out_dir: str | Path, settings: StudySettings, *, base_model: str | None = None,
              log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Run every step; returns the summary (also written to ``out_dir/summary.json``)."""
    from avec.intervene.orthogonalize import save_orthogonalized
    from avec.models import load_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = _instruction_sets(Path(settings.data_dir))
    times: dict[str, float] = {}
    summary: dict[str, Any] = {"settings": asdict(settings), "seconds": times}

    tuned_dir = _make_refuser(out, settings, sets, base_model, log, times, summary)

    t0 = time.perf_counter()
    tuned = load_model(tuned_dir)
    log("[3/5] direction selection")
    sel, sel_paths = _select(tuned, settings, sets, out)
    times["select"] = time.perf_counter() - t0
    summary["selection"] = {"chosen": asdict(sel.chosen), "baseline": sel.baseline,
                            "refusal_tokens": sel.refusal_token_info, "files": sel_paths}

    t0 = time.perf_counter()
    log("[4/5] weight orthogonalization")
    ortho_dir = save_orthogonalized(tuned, sel.vector[sel.chosen.layer],
                                    out / "smollm2-refuses-orthogonalized",
                                    metadata={"vector": sel_paths["vector"]})
    ortho = load_model(ortho_dir)
    times["orthogonalize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[5/5] evaluation on {settings.n_eval} held-out harmful and harmless instructions")
    summary["eval"] = _evaluate(tuned, ortho, sel.vector, settings, sets, base_model,
                                Path(settings.data_dir), out)
    times["evaluate"] = time.perf_counter() - t0
    write_json(out / "summary.json", summary, default=str)
    return summary


def _instruction_sets(data: Path) -> dict[str, list[str]]:
    from avec.studies.refusal.data import load_instructions

    missing = [f for f in DATA_FILES if not (data / f"{f}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{data} lacks {', '.join(m + '.json' for m in missing)}; "
                                f"pass --data-dir with the refusal instruction files")
    return {f: load_instructions(data / f"{f}.json") for f in DATA_FILES}


def _make_refuser(out: Path, settings: StudySettings, sets: dict[str, list[str]],
                  base_model: str | None, log: Callable[[str], None], times: dict[str, float],
                  summary: dict[str, Any]) -> Path:
    """Steps 1 and 2: the safety fine-tuning set, then the fine-tuned model's directory."""
    from avec.models import load_model
    from avec.studies.refusal.data import safety_examples
    from avec.studies.refusal.finetune import (FinetuneConfig, finetune, save_examples,
                                               save_finetuned)

    t0 = time.perf_counter()
    base = load_model(base_model)
    log(f"[1/5] safety fine-tuning set: refusals on {settings.n_harmful_train} harmful, "
        f"{base.name}'s own answers on {settings.n_harmless_train} harmless instructions")
    examples = safety_examples(base, sets["harmful_train"][:settings.n_harmful_train],
                               sets["harmless_train"][:settings.n_harmless_train],
                               seed=settings.seed, max_new_tokens=settings.distil_tokens,
                               progress=True)
    save_examples(examples, out / "sft.jsonl")
    times["dataset"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[2/5] fine-tuning on {len(examples)} examples")
    cfg_args: dict[str, Any] = {"epochs": settings.epochs, "lora_rank": settings.lora_rank,
                                "seed": settings.seed}
    if settings.learning_rate is not None:
        cfg_args["learning_rate"] = settings.learning_rate
    result = finetune(base, examples, FinetuneConfig(**cfg_args), progress=True)
    tuned_dir = save_finetuned(result, out / "smollm2-refuses",
                               metadata={"recipe": "avec refusal reproduce",
                                         "examples": str(out / "sft.jsonl")})
    times["finetune"] = time.perf_counter() - t0
    summary["finetune"] = {"losses_first_last": [result.losses[0], result.losses[-1]],
                           "seconds": result.seconds, "dir": str(tuned_dir)}
    return tuned_dir


def _select(tuned: Any, settings: StudySettings, sets: dict[str, list[str]], out: Path
            ) -> tuple[Any, dict[str, str]]:
    """Step 3: the refusal direction chosen on the tuned model, and its files."""
    from avec.studies.refusal.select import select_direction, write_selection

    n_t, n_v = settings.n_select_train, settings.n_select_val
    sel = select_direction(tuned, sets["harmful_train"][:n_t], sets["harmless_train"][:n_t],
                           sets["harmful_val"][:n_v], sets["harmless_val"][:n_v],
                           kl_max=settings.kl_max, fallback_kl_max=settings.fallback_kl_max,
                           progress=True)
    return sel, write_selection(sel, out / "select")


def _evaluate(tuned: Any, ortho: Any, vector: Any, settings: StudySettings,
              sets: dict[str, list[str]], base_model: str | None, data: Path,
              out: Path) -> dict[str, str]:
    """Step 5: every condition on held-out instructions, plus the original model's row."""
    from avec.models import load_model
    from avec.studies.refusal.evaluate import evaluate_refusal, standard_conditions, write_results

    essays = [p.read_text() for p in sorted((data.parent / "actadd").glob("*.txt"))]
    harmful = sets["harmful_test"][:settings.n_eval]
    harmless = sets["harmless_test"][:settings.n_eval]
    results = evaluate_refusal(standard_conditions(tuned, vector, ortho), harmful, harmless,
                               essays=essays, max_new_tokens=settings.eval_tokens, progress=True)
    base_model_row = evaluate_refusal([standard_conditions(load_model(base_model), vector)[0]],
                                      harmful, harmless, essays=essays,
                                      max_new_tokens=settings.eval_tokens)[0]
    base_model_row.name = "original model (before fine-tuning)"
    base_model_row.kl_harmless = None  # another model: no KL against the tuned one
    return write_results([base_model_row, *results], out / "eval",
                         settings={"n_eval": settings.n_eval,
                                   "max_new_tokens": settings.eval_tokens, "essays": len(essays)})
