"""Refusal direction selection (Arditi et al. 2024, section 2.3 and appendix C).

Candidates are differences of means, harmful minus harmless, at the output of every block L
and every post-instruction token position i (the template tokens after the user's message,
e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``). Each candidate r gets:

- **bypass**: the refusal metric on harmful validation prompts with r ablated everywhere
  (:func:`avec.intervene.ablation.ablate_direction`); lower is better;
- **induce**: the refusal metric on harmless validation prompts with r added at block L;
- **KL**: KL(plain || ablated) of the next-token distribution on harmless validation prompts.

Candidates with KL > ``kl_max``, induce < 0, or L in the last ``1 - max_layer_frac`` of the
blocks are discarded; the lowest bypass score wins. The refusal metric is the log-odds of the
refusal first tokens at the last position, log p - log(1 - p) with p their summed
probability; those tokens are read off the model's own refusals, not hard-coded.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from tqdm.auto import tqdm

from avec.directions.activations import forward_until, pad_batch
from avec.errors import SteeringError
from avec.evaluate.forward import tail_logits
from avec.evaluate.refusal import is_refusal
from avec.generation.hf import format_prompt, generate_ids
from avec.models.model import Model
from avec.report import heatmap, write_csv, write_json
from avec.vector import SteeringVector

PLACEHOLDER = "\x00INSTRUCTION\x00"


def post_instruction_tokens(model: Model) -> list[int]:
    """Token ids the chat template puts after the user's instruction (up to the point where
    the assistant's reply starts)."""
    if not model.has_chat_template:
        raise SteeringError(f"{model.name} has no chat template, so it has no post-instruction "
                            f"tokens; refusal direction selection needs a chat model")
    text = model.chat_prompt(PLACEHOLDER)
    if text.count(PLACEHOLDER) != 1:
        raise SteeringError("the chat template does not contain the instruction exactly once")
    suffix = text.split(PLACEHOLDER)[1]
    ids = list(model.tokenizer(suffix, add_special_tokens=False)["input_ids"])
    probe = format_prompt(model, "Tell me a joke.")[0]
    if not ids or probe[-len(ids):] != ids:
        raise SteeringError(f"the template suffix {suffix!r} does not tokenize the same on its "
                            f"own as inside a prompt; cannot locate post-instruction positions")
    return ids


@torch.inference_mode()
def last_logits(model: Model, token_lists: Sequence[list[int]], batch_size: int = 32
                ) -> torch.Tensor:
    """Next-token logits ``[N, vocab]`` (float32) after each token list, left-padded batches,
    under whatever interventions are active."""
    return torch.cat(tail_logits(model, token_lists, 1, batch_size))


@torch.inference_mode()
def mean_activations(model: Model, token_lists: Sequence[list[int]], n_positions: int,
                     batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Mean block outputs ``[n_layers, n_positions, d]`` at the last ``n_positions`` tokens of
    each list (position j is index ``j - n_positions``)."""
    total = torch.zeros(model.n_layers, n_positions, model.d_model, dtype=torch.float64)
    starts = range(0, len(token_lists), batch_size)
    for start in tqdm(starts, desc="activations", disable=not progress, leave=False):
        ids, mask, pos = pad_batch(list(token_lists[start:start + batch_size]),
                                   model.tokenizer.pad_token_id, "left", model.device)

        def collect(layer: int, hidden: torch.Tensor) -> None:
            total[layer] += hidden[:, -n_positions:].double().sum(0).cpu()

        forward_until(model, range(model.n_layers), collect, ids, mask, pos)
    return (total / len(token_lists)).float()


def refusal_metric(logits: torch.Tensor, refusal_tokens: Sequence[int]) -> torch.Tensor:
    """Per-row log-odds log p - log(1 - p), p = summed probability of ``refusal_tokens``."""
    logp = logits.log_softmax(-1)[:, list(refusal_tokens)].logsumexp(-1).clamp(max=-1e-6)
    return logp - torch.log1p(-logp.exp())


def find_refusal_tokens(model: Model, harmful: Sequence[list[int]],
                        harmless: Sequence[list[int]], *, max_new_tokens: int = 12,
                        coverage: float = 0.95, batch_size: int = 32
                        ) -> tuple[list[int], dict[str, Any]]:
    """The first tokens of the model's own refusals: greedy completions of harmful prompts
    that refuse, their first tokens ranked by how much more often they start refusals than
    harmless answers, kept until ``coverage`` of the refusals are covered."""
    def firsts(prompts: Sequence[list[int]]) -> tuple[Counter, int]:
        counts: Counter = Counter()
        refused = 0
        for start in range(0, len(prompts), batch_size):
            for toks in generate_ids(model, list(prompts[start:start + batch_size]),
                                     max_new_tokens):
                text = model.tokenizer.decode(toks, skip_special_tokens=True)
                if toks and is_refusal(text):
                    counts[toks[0]] += 1
                    refused += 1
        return counts, refused

    def all_firsts(prompts: Sequence[list[int]]) -> Counter:
        counts: Counter = Counter()
        for start in range(0, len(prompts), batch_size):
            rows = generate_ids(model, list(prompts[start:start + batch_size]), 1)
            counts.update(r[0] for r in rows if r)
        return counts

    ref_counts, n_refused = firsts(harmful)
    if n_refused == 0:
        raise SteeringError(
            f"{model.name} refused none of {len(harmful)} harmful prompts, so it has no refusal "
            f"tokens to find; selection needs a model that refuses (`avec refusal make-model` "
            f"fine-tunes one)")
    benign = all_firsts(harmless)
    ranked = sorted(ref_counts, key=lambda t: -(ref_counts[t] / n_refused
                                                - benign[t] / max(1, len(harmless))))
    chosen, covered = [], 0
    for tok in ranked:
        if ref_counts[tok] / n_refused <= benign[tok] / max(1, len(harmless)):
            break
        chosen.append(int(tok))
        covered += ref_counts[tok]
        if covered / n_refused >= coverage:
            break
    if not chosen:
        raise SteeringError("the model's refusals start with the same tokens as its harmless "
                            "answers; no refusal token separates them")
    info = {"tokens": [model.tokenizer.convert_ids_to_tokens(t) for t in chosen],
            "refused": n_refused, "of": len(harmful), "coverage": covered / n_refused,
            "harmless_share": sum(benign[t] for t in chosen) / max(1, len(harmless))}
    return chosen, info


class NoEligibleCandidate(SteeringError):
    """Every candidate was discarded; ``candidates`` holds their scores and reasons."""

    def __init__(self, candidates: list["Candidate"]) -> None:
        reasons = Counter((c.discarded or "?").split(" ")[0] for c in candidates)
        super().__init__(f"every candidate was discarded ({dict(reasons)}); see the candidate "
                         f"table, or loosen --kl-max (small models often exceed KL 0.1)")
        self.candidates = candidates


@dataclass
class Candidate:
    layer: int
    position: int  # negative index: -k .. -1 among the post-instruction tokens
    token: str
    norm: float
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    discarded: str | None = None  # why it cannot be chosen, or None
    screen: float | None = None  # bypass on the prescreen's few prompts (when prescreened)


@dataclass
class Selection:
    """What :func:`select_direction` found; ``vector`` is the chosen direction."""

    vector: SteeringVector
    chosen: Candidate
    candidates: list[Candidate]
    refusal_tokens: list[int]
    refusal_token_info: dict[str, Any]
    baseline: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": asdict(self.chosen), "baseline": self.baseline,
                "refusal_tokens": self.refusal_token_info, "settings": self.settings,
                "candidates": [asdict(c) for c in self.candidates]}


def mean_kl(base: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(base) || softmax(other)) for logits ``[N, vocab]``."""
    lp, lq = base.log_softmax(-1), other.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).mean())


def apply_filters(candidates: Sequence[Candidate], *, kl_max: float, min_induce: float,
                  first_excluded_layer: int, excluded_share: float = 0.2) -> list[Candidate]:
    """Mark each candidate's ``discarded`` reason (layer, zero norm, KL, induce, in that
    order); return the eligible ones (scored and not discarded)."""
    eligible = []
    for c in candidates:
        if c.layer >= first_excluded_layer:
            c.discarded = f"layer in the last {excluded_share:.0%}"
        elif c.norm == 0:
            c.discarded = "zero direction"
        elif c.bypass is None or c.kl is None or c.induce is None:
            c.discarded = c.discarded if c.discarded and "prescreen" in c.discarded \
                else "not scored"
        elif c.kl > kl_max:
            c.discarded = f"KL {c.kl:.3f} > {kl_max}"
        elif c.induce < min_induce:
            c.discarded = f"induce {c.induce:.2f} < {min_induce:g}"
        else:
            c.discarded = None
            eligible.append(c)
    return eligible


def _score(model: Model, todo: Sequence[Candidate], diffs: torch.Tensor, k: int,
           h_val: list[list[int]], b_val: list[list[int]], base_b: torch.Tensor,
           tokens: Sequence[int], batch_size: int, progress: bool) -> None:
    """Fill in each candidate's bypass (refusal score on harmful prompts with the direction
    ablated), KL on harmless prompts under that ablation, and induce (refusal score on harmless
    prompts with it added)."""
    from avec.intervene.ablation import ablate_direction
    from avec.intervene.steer import steer

    def scored(ctx: Callable[[], ContextManager[Any]], prompts: list[list[int]]) -> torch.Tensor:
        with ctx():
            return last_logits(model, prompts, batch_size)

    for c in tqdm(todo, desc="candidates", disable=not progress, leave=False):
        r = diffs[c.layer, c.position + k]
        vec = SteeringVector({c.layer: r})
        c.bypass = float(refusal_metric(
            scored(lambda: ablate_direction(model, r), h_val), tokens).mean())
        c.kl = mean_kl(base_b, scored(lambda: ablate_direction(model, r), b_val))
        c.induce = float(refusal_metric(
            scored(lambda: steer(model, vec, coef=1.0), b_val), tokens).mean())


def _prescreen(model: Model, todo: list[Candidate], diffs: torch.Tensor, k: int,
               h_val: list[list[int]], tokens: Sequence[int], keep: int, n_prompts: int,
               batch_size: int, progress: bool) -> list[Candidate]:
    """Score every candidate's bypass on the first ``n_prompts`` harmful validation prompts
    (one forward each); return the ``keep`` lowest, marking the others discarded."""
    from avec.intervene.ablation import ablate_direction

    few = h_val[:n_prompts]
    for c in tqdm(todo, desc="prescreen", disable=not progress, leave=False):
        with ablate_direction(model, diffs[c.layer, c.position + k]):
            c.screen = float(refusal_metric(last_logits(model, few, batch_size), tokens).mean())
    ranked = sorted(todo, key=lambda c: c.screen)  # type: ignore[arg-type, return-value]
    for c in ranked[keep:]:
        c.discarded = (f"prescreen: bypass {c.screen:.2f} on {len(few)} prompts, not among "
                       f"the best {keep}")
    return ranked[:keep]


def select_direction(model: Model, harmful_train: Sequence[str], harmless_train: Sequence[str],
                     harmful_val: Sequence[str], harmless_val: Sequence[str], *,
                     kl_max: float = 0.1, max_layer_frac: float = 0.8, batch_size: int = 32,
                     min_induce: float = 0.0, fallback_kl_max: float | None = None,
                     refusal_tokens: Sequence[int] | None = None,
                     prescreen: int | None = None, prescreen_prompts: int = 8,
                     progress: bool = False) -> Selection:
    """Pick the refusal direction among every layer x post-instruction position (see the
    module docstring). Candidates in the last ``1 - max_layer_frac`` of the layers are listed
    as discarded without being scored (they cannot be chosen). ``min_induce`` is the induce
    threshold (0 in the paper). When no candidate passes ``kl_max``, ``fallback_kl_max`` (if
    given) is tried instead, without rescoring; ``settings["kl_max_used"]`` records which
    threshold chose. ``refusal_tokens`` overrides the tokens
    :func:`find_refusal_tokens` reads off the model's refusals.

    ``prescreen`` (for big models, where full scoring costs three forwards of every
    validation prompt per candidate): first score every candidate's bypass on the first
    ``prescreen_prompts`` harmful validation prompts, then fully score only the ``prescreen``
    best; the rest are listed as discarded by the prescreen, with their screening score."""
    if prescreen is not None and prescreen < 1:
        raise ValueError(f"prescreen must keep at least 1 candidate, got {prescreen}")
    if prescreen_prompts < 1:
        raise ValueError(f"prescreen_prompts must be at least 1, got {prescreen_prompts}")
    suffix = post_instruction_tokens(model)
    k = len(suffix)
    enc = [[format_prompt(model, p)[0] for p in group]
           for group in (harmful_train, harmless_train, harmful_val, harmless_val)]
    h_train, b_train, h_val, b_val = enc
    if refusal_tokens is None:
        tokens, token_info = find_refusal_tokens(model, h_val, b_val, batch_size=batch_size)
    else:
        tokens = [int(t) for t in refusal_tokens]
        token_info = {"tokens": model.tokenizer.convert_ids_to_tokens(tokens), "given": True}
    mu_h = mean_activations(model, h_train, k, batch_size, progress)
    mu_b = mean_activations(model, b_train, k, batch_size, progress)
    diffs = mu_h - mu_b
    base_h = last_logits(model, h_val, batch_size)
    base_b = last_logits(model, b_val, batch_size)
    baseline = {"harmful": float(refusal_metric(base_h, tokens).mean()),
                "harmless": float(refusal_metric(base_b, tokens).mean())}
    last_allowed = int(max_layer_frac * model.n_layers)
    names = model.tokenizer.convert_ids_to_tokens(suffix)
    candidates = [Candidate(L, j - k, names[j], float(diffs[L, j].norm()))
                  for L in range(model.n_layers) for j in range(k)]

    todo = [c for c in candidates if c.layer < last_allowed and c.norm > 0]
    if prescreen is not None and prescreen < len(todo):
        todo = _prescreen(model, todo, diffs, k, h_val, tokens, prescreen, prescreen_prompts,
                          batch_size, progress)
    _score(model, todo, diffs, k, h_val, b_val, base_b, tokens, batch_size, progress)
    kl_used = kl_max
    eligible = apply_filters(candidates, kl_max=kl_max, min_induce=min_induce,
                             first_excluded_layer=last_allowed, excluded_share=1 - max_layer_frac)
    if not eligible and fallback_kl_max is not None:
        kl_used = fallback_kl_max
        eligible = apply_filters(candidates, kl_max=fallback_kl_max, min_induce=min_induce,
                                 first_excluded_layer=last_allowed,
                                 excluded_share=1 - max_layer_frac)
    if not eligible:
        raise NoEligibleCandidate(candidates)
    best = min(eligible, key=lambda c: c.bypass)  # type: ignore[arg-type, return-value]
    r = diffs[best.layer, best.position + k].clone()
    unit = r / r.norm()
    proj_h = float(mu_h[best.layer, best.position + k] @ unit)
    proj_b = float(mu_b[best.layer, best.position + k] @ unit)
    settings = {"n_harmful_train": len(h_train), "n_harmless_train": len(b_train),
                "n_harmful_val": len(h_val), "n_harmless_val": len(b_val), "kl_max": kl_max,
                "kl_max_used": kl_used, "max_layer_frac": max_layer_frac,
                "min_induce": min_induce, "prescreen": prescreen,
                "prescreen_prompts": prescreen_prompts if prescreen is not None else None,
                "post_instruction_tokens": names}
    meta = {"model": model.identity(), "method": "refusal_direction (diff of means)",
            "positions": f"post-instruction token {best.position} ({best.token!r})",
            "chat_template": True, "n_pairs": min(len(h_train), len(b_train)),
            "refusal": {"layer": best.layer, "position": best.position, "token": best.token,
                        "bypass": best.bypass, "induce": best.induce, "kl": best.kl,
                        "harmful_mean_projection": proj_h, "harmless_mean_projection": proj_b,
                        "refusal_tokens": token_info["tokens"], "baseline": baseline},
            "clamp_value": proj_h}
    vector = SteeringVector({best.layer: r}, meta)
    return Selection(vector, best, candidates, tokens, token_info, baseline, settings)


def write_candidates(candidates: Sequence[Candidate], path: str | Path,
                     chosen: Candidate | None = None) -> Path:
    """The candidate table as CSV (one row per layer x position, scores and why discarded)."""
    return write_csv(path, ["layer", "position", "token", "norm", "screen", "bypass", "induce",
                            "kl", "discarded", "chosen"],
                     ([c.layer, c.position, c.token, f"{c.norm:.4f}",
                       "" if c.screen is None else f"{c.screen:.4f}",
                       "" if c.bypass is None else f"{c.bypass:.4f}",
                       "" if c.induce is None else f"{c.induce:.4f}",
                       "" if c.kl is None else f"{c.kl:.4f}", c.discarded or "",
                       int(c is chosen)] for c in candidates))


def write_selection(sel: Selection, out_dir: str | Path) -> dict[str, str]:
    """``refusal_direction.safetensors``, ``candidates.json``/``.csv`` and
    ``candidates.png`` (bypass score per layer x position) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"vector": str(sel.vector.save(out / "refusal_direction.safetensors")),
             "json": str(out / "candidates.json"), "csv": str(out / "candidates.csv"),
             "png": str(out / "candidates.png")}
    write_json(paths["json"], sel.to_dict())
    write_candidates(sel.candidates, paths["csv"], sel.chosen)
    positions = sorted({c.position for c in sel.candidates})
    layers = sorted({c.layer for c in sel.candidates})
    grid = torch.full((len(positions), len(layers)), math.nan)
    for c in sel.candidates:
        if c.bypass is not None:
            grid[positions.index(c.position), layers.index(c.layer)] = c.bypass
    tok = {c.position: c.token for c in sel.candidates}
    heatmap(grid.tolist(), paths["png"], rows=[f"{p} {tok[p]!r}" for p in positions], cols=layers,
            xlabel="layer (block output)", cmap="viridis_r", annotate=None,
            marks=[(positions.index(c.position), layers.index(c.layer), "x")
                   for c in sel.candidates if c.discarded and c.bypass is not None],
            star=(positions.index(sel.chosen.position), layers.index(sel.chosen.layer)),
            figsize=(max(6, 0.35 * len(layers)), 1.2 + 0.5 * len(positions)), tick_fontsize=7,
            title="bypass score (refusal log-odds on harmful prompts under ablation; lower = "
                  "better)\nx: discarded (KL or induce), *: chosen, blank: last 20% of layers"
                  + (" or not kept by the prescreen" if sel.settings.get("prescreen") else ""),
            title_fontsize=9)
    if any(c.screen is not None for c in sel.candidates):
        paths["prescreen_png"] = str(out / "prescreen.png")
        screen = torch.full((len(positions), len(layers)), math.nan)
        for c in sel.candidates:
            if c.screen is not None:
                screen[positions.index(c.position), layers.index(c.layer)] = c.screen
        heatmap(screen.tolist(), paths["prescreen_png"],
                rows=[f"{p} {tok[p]!r}" for p in positions], cols=layers,
                xlabel="layer (block output)", cmap="viridis_r", annotate=None,
                star=(positions.index(sel.chosen.position), layers.index(sel.chosen.layer)),
                figsize=(max(6, 0.35 * len(layers)), 1.2 + 0.5 * len(positions)),
                tick_fontsize=7, title_fontsize=9,
                title=f"prescreen: bypass score on {sel.settings.get('prescreen_prompts')} "
                      f"harmful prompts (the best {sel.settings.get('prescreen')} were fully "
                      f"scored)")
    return paths

