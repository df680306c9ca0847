"""Refusal evaluation in the form of Arditi et al.'s tables: refusal score (substring match)
on held-out harmful and harmless instructions, greedy, under each intervention, plus what
else changed (KL on harmless prompts, perplexity of reference essays)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

from tqdm.auto import tqdm

from avec.evaluate.side_effects import perplexity
from avec.generation.hf import format_prompt, steered_completions
from avec.models.model import Model
from avec.report import write_json
from avec.evaluate.refusal import is_refusal
from avec.studies.refusal.select import last_logits, mean_kl
from avec.vector import SteeringVector


@dataclass
class Condition:
    """One row of the table: a model and the interventions active while it runs."""

    name: str
    model: Model
    context: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    description: str = ""


def refusal_info(vector: SteeringVector) -> dict[str, Any]:
    info = vector.metadata.get("refusal")
    if not isinstance(info, dict) or "layer" not in info:
        raise ValueError("this vector has no refusal metadata (layer, mean projections); make "
                         "it with `avec refusal select`")
    return info


def standard_conditions(model: Model, vector: SteeringVector,
                        orthogonalized: Model | None = None,
                        add_coefs: Sequence[float] = (1.0,)) -> list[Condition]:
    """base; ablation everywhere; clamp-to-mean at the direction's layer (harmful mean, and
    harmless mean); addition at its layer, one row per coefficient of ``add_coefs`` (1: the
    difference of means itself, the paper's strength); the orthogonalized model if given."""
    from avec.intervene.ablation import ablate_direction
    from avec.intervene.steer import steer

    if not add_coefs or any(not math.isfinite(c) or c <= 0 for c in add_coefs):
        raise ValueError(f"addition coefficients must be finite and > 0, got {list(add_coefs)}")
    info = refusal_info(vector)
    layer = int(info["layer"])
    r = vector[layer]
    rows = [
        Condition("base", model, description="the model as it is"),
        Condition("ablation", model, lambda: ablate_direction(model, r),
                  "direction projected out of the residual stream everywhere"),
        Condition("clamp to harmful mean", model,
                  lambda: steer(model, vector, op="clamp",
                                value=float(info["harmful_mean_projection"])),
                  f"projection set to its harmful-prompt mean at layer {layer}, all tokens"),
        Condition("clamp to harmless mean", model,
                  lambda: steer(model, vector, op="clamp",
                                value=float(info["harmless_mean_projection"])),
                  f"projection set to its harmless-prompt mean at layer {layer}, all tokens"),
    ]
    for c in dict.fromkeys(float(c) for c in add_coefs):
        rows.append(Condition(
            "add" if c == 1.0 else f"add x{c:g}", model,
            lambda c=c: steer(model, vector, coef=c),
            f"direction (difference of means) x {c:g} added at layer {layer}, all tokens"))
    if orthogonalized is not None:
        rows.append(Condition("orthogonalized", orthogonalized,
                              description="weights with the direction folded out, no hooks"))
    return rows


@dataclass
class ConditionResult:
    name: str
    description: str
    harmful_refusal: float
    harmless_refusal: float
    kl_harmless: float | None  # None: a different model than the reference
    perplexity: float | None
    samples: dict[str, list[str]] = field(default_factory=dict)


def _completions(model: Model, prompts: Sequence[str], max_new_tokens: int, batch_size: int
                 ) -> list[str]:
    rows = steered_completions(model, prompts, None, [0.0], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    return [r.text for r in rows]


def evaluate_refusal(conditions: Sequence[Condition], harmful: Sequence[str],
                     harmless: Sequence[str], *, essays: Sequence[str] = (),
                     max_new_tokens: int = 32, batch_size: int = 32, n_samples: int = 3,
                     progress: bool = False) -> list[ConditionResult]:
    """Refusal rates on ``harmful`` and ``harmless`` (greedy, ``max_new_tokens``), KL(base ||
    condition) of the next token after each harmless prompt, and the perplexity of ``essays``,
    for every condition. The first condition is the reference for KL."""
    if not conditions:
        raise ValueError("no conditions to evaluate")
    ref = conditions[0]
    ref_tokens = [format_prompt(ref.model, p)[0] for p in harmless]
    with ref.context():
        base = last_logits(ref.model, ref_tokens, batch_size)
    results = []
    for cond in tqdm(conditions, desc="conditions", disable=not progress, leave=False):
        tokens = [format_prompt(cond.model, p)[0] for p in harmless]
        with cond.context():
            harm = _completions(cond.model, harmful, max_new_tokens, batch_size)
            safe = _completions(cond.model, harmless, max_new_tokens, batch_size)
            kl = mean_kl(base, last_logits(cond.model, tokens, batch_size))
            ppl = perplexity(cond.model, essays, None, None, [0.0])[0] if essays else None
        results.append(ConditionResult(
            cond.name, cond.description, sum(map(is_refusal, harm)) / len(harm),
            sum(map(is_refusal, safe)) / len(safe), kl, ppl,
            {"harmful": harm[:n_samples], "harmless": safe[:n_samples]}))
    return results


def results_table(results: Sequence[ConditionResult]) -> str:
    """Markdown table of the results."""
    lines = ["| condition | harmful refused | harmless refused | KL on harmless | "
             "essay perplexity |", "|---|---|---|---|---|"]
    for r in results:
        ppl = "" if r.perplexity is None else f"{r.perplexity:.3f}"
        kl = "n/a" if r.kl_harmless is None else f"{r.kl_harmless:.4f}"
        lines.append(f"| {r.name} | {r.harmful_refusal:.2f} | {r.harmless_refusal:.2f} | "
                     f"{kl} | {ppl} |")
    return "\n".join(lines)


def write_results(results: Sequence[ConditionResult], out_dir: str | Path,
                  settings: dict[str, Any] | None = None) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "refusal_eval.json"), "md": str(out / "refusal_eval.md")}
    write_json(paths["json"], {"settings": settings or {},
                               "results": [asdict(r) for r in results]})
    Path(paths["md"]).write_text(results_table(results) + "\n")
    return paths
