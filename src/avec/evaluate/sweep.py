"""Layers x coefficients sweeps of any metric, written as JSON, CSV and a heatmap PNG."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from avec.evaluate.ab import ABItem, ab_sweep
from avec.evaluate.concepts import EmbeddingJudge, keyword_rate
from avec.evaluate.side_effects import kl_divergence, logit_difference, perplexity
from avec.generation.hf import steered_completions
from avec.models.model import Model
from avec.report import heatmap, write_csv, write_json
from avec.vector import SteeringVector

METRICS = ("ab", "kl", "ppl", "logit_diff", "concept")
LABELS = {"ab": "p(match) (A/B)", "kl": "KL(unsteered || steered)", "ppl": "perplexity",
          "logit_diff": "logit difference", "concept": "concept score"}


@dataclass
class SweepResult:
    metric: str
    layers: list[int]
    coefs: list[float]
    values: list[list[float]]  # [layer][coef]
    extra: dict[str, Any] = field(default_factory=dict)

    def best(self, higher: bool = True) -> tuple[int, float, float]:
        """(layer, coef, value) of the best cell."""
        cells = [(L, c, v) for L, row in zip(self.layers, self.values)
                 for c, v in zip(self.coefs, row)]
        return (max if higher else min)(cells, key=lambda x: x[2])

    def write(self, out_dir: str | Path, title: str = "") -> dict[str, str]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"sweep_{self.metric}.json", "csv": out / f"sweep_{self.metric}.csv",
                 "png": out / f"sweep_{self.metric}.png"}
        write_json(paths["json"], asdict(self))
        write_csv(paths["csv"], ["layer", *[f"coef={c:g}" for c in self.coefs]],
                  ([L, *[f"{v:.6g}" for v in row]] for L, row in zip(self.layers, self.values)))
        plot_sweep(self, paths["png"], title)
        return {k: str(v) for k, v in paths.items()}


def plot_sweep(result: SweepResult, path: Path, title: str = "") -> Path:
    """The sweep as a layers x coefficients heatmap with each cell's value."""
    label = LABELS.get(result.metric, result.metric)
    return heatmap(result.values, path, rows=result.layers, cols=[f"{c:g}" for c in result.coefs],
                   title=title or label, xlabel="coefficient", ylabel="layer", colorbar=label)


def run_sweep(model: Model, metric: str, vector: SteeringVector | None, layers: Sequence[int],
              coefs: Sequence[float], *, items: Sequence[ABItem] = (), prompts: Sequence[str] = (),
              texts: Sequence[str] = (), token_pairs: Sequence[tuple[str, str]] = (),
              keywords: Sequence[str] = (), concept: str = "", max_new_tokens: int = 48,
              chat: bool = True, progress: bool = False) -> SweepResult:
    """Evaluate ``metric`` at every (layer, coefficient); coefficients of one layer share passes."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {list(METRICS)}")
    layers, coefs = list(layers), [float(c) for c in coefs]
    extra: dict[str, Any] = {}
    if metric == "ab":
        if not items:
            raise ValueError("metric 'ab' needs A/B items (--data)")
        scores = ab_sweep(model, items, vector, layers, coefs, chat=chat, progress=progress)
        extra["n_items"] = len(items)
        return SweepResult(metric, layers, coefs, scores.mean(-1).tolist(), extra)
    per_layer: Callable[[int], list[float]]
    if metric == "kl":
        _need(prompts, "kl", "--prompts")
        per_layer = lambda L: kl_divergence(model, prompts, vector, L, coefs)  # noqa: E731
    elif metric == "ppl":
        _need(texts, "ppl", "--texts")
        # an ActAdd block is injected at the first T positions: those do not count
        skip = vector.shape[0] if vector is not None and len(vector.shape) == 2 else 0
        extra["skip_positions"] = skip
        per_layer = lambda L: perplexity(model, texts, vector, L, coefs,  # noqa: E731
                                         skip_positions=skip)
    elif metric == "logit_diff":
        _need(prompts, "logit_diff", "--prompts")
        _need(token_pairs, "logit_diff", "--tokens A B")
        per_layer = lambda L: logit_difference(model, prompts, token_pairs, vector, L,  # noqa: E731
                                               coefs)
    else:
        _need(prompts, "concept", "--prompts")
        if not keywords and not concept:
            raise ValueError("metric 'concept' needs --keywords and/or --concept")
        judge = EmbeddingJudge() if concept else None
        samples: dict[str, list[dict[str, Any]]] = {}

        def per_layer(L: int) -> list[float]:
            comps = steered_completions(model, prompts, vector, coefs, layers=[L],
                                        max_new_tokens=max_new_tokens)
            row = []
            for c in coefs:
                txt = [x.text for x in comps if x.coef == c]
                if judge is None:
                    row.append(keyword_rate(txt, keywords))
                    continue
                row.append(sum(judge.scores(txt, concept)) / len(txt))
                if keywords:
                    extra.setdefault("keyword_rate", {}).setdefault(str(L), []).append(
                        keyword_rate(txt, keywords))
            samples[str(L)] = [x.to_dict() for x in comps[: 2 * len(coefs)]]
            return row

        extra["samples"] = samples
        extra["score"] = "embedding similarity to concept" if concept else "keyword rate"
    values = [per_layer(L) for L in tqdm(layers, desc=metric, disable=not progress, leave=False)]
    return SweepResult(metric, layers, coefs, values, extra)


def _need(value: Sequence[Any], metric: str, flag: str) -> None:
    if not value:
        raise ValueError(f"metric {metric!r} needs {flag}")


def parse_layers(spec: str, max_layers: int = 10_000) -> list[int]:
    """``"14"``, ``"4,8,12"``, ``"4-20"`` or ``"4-20:2"`` (inclusive range with step); at most
    ``max_layers`` layers in all (a typo such as ``0-99999999999`` is refused, not expanded)."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            step = 1
            if ":" in part:
                part, step_s = part.split(":")
                step = int(step_s)
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                if step < 1 or (int(b) - int(a)) // step >= max_layers:
                    raise ValueError
                out.extend(range(int(a), int(b) + 1, step))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"invalid layers {spec[:80]!r}: use 14, 4,8,12 or 4-20[:step] "
                             f"(a step >= 1, at most {max_layers} layers)") from None
        if len(out) > max_layers:
            raise ValueError(f"--layers {spec[:80]!r} names more than {max_layers} layers")
    return out
