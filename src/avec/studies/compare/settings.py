"""What a comparison is: its settings, its task, and its result (with the per-cell summary)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from avec.evaluate.ab import ABItem
from avec.models.model import Model

DEFAULT_METHODS = ("mean_diff", "pca", "probe", "actadd", "random")


@dataclass
class CompareSettings:
    layer: int
    methods: Sequence[str] = DEFAULT_METHODS
    n_pairs: Sequence[int] = (1, 3, 8, 32, 128, 256)
    seeds: int = 3
    coefs: Sequence[float] = (1.0, 2.0, 3.0, 4.0, 6.0)
    kl_budget: float = 1.0
    norm: float | None = None
    chat: bool = False
    position: str | int = "mean"  # for sentence pairs; CAA A/B pools read "ab_letter"
    max_new_tokens: int = 32
    sae: str | None = None  # SAE directory for the SAE methods (trained at this layer)
    sae_select: str = "selective"  # how the SAE methods rank latents (avec.sae.evaluate)
    # the fine-tuning rows (lora, lora+mean_diff; see avec.studies.compare.finetuned)
    lora_steps: int = 16  # optimizer steps per fine-tune, whatever the number of pairs
    lora_batch_size: int = 8  # examples per step (fewer when there are fewer pairs)
    lora_rank: int = 16
    lora_lr: float | None = None  # None: avec finetune's LoRA default (1e-3)
    lora_scales: Sequence[float] = (0.0625, 0.125, 0.25, 0.5, 1.0)  # of the learned update


@dataclass
class Task:
    """What the effect is measured on: A/B items, or prompts + a concept (and/or keywords)."""

    items: Sequence[ABItem] = ()
    prompts: Sequence[str] = ()
    concept: str = ""
    keywords: Sequence[str] = ()
    name: str = ""
    pairs_source: str = ""  # where the pool of pairs came from (file, or synthetic + generator)

    @property
    def kind(self) -> str:
        return "ab" if self.items else "concept"


@dataclass
class CompareResult:
    settings: dict[str, Any]
    task: dict[str, Any]
    baseline: float
    common_norm: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (method, n, seed)
    model: dict[str, Any] = field(default_factory=dict)  # identity of the model compared on
    avec_version: str = ""
    prompts: list[str] = field(default_factory=list)  # concept tasks: the prompts generated from
    unsteered: list[str] = field(default_factory=list)  # ... and their unsteered completions
    machine: dict[str, Any] = field(default_factory=dict)  # what the cost seconds ran on

    def summary(self) -> list[dict[str, Any]]:
        cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in self.rows:
            cells.setdefault((r["method"], r["n_pairs"]), []).append(r)
        out = []
        for (method, n), rs in sorted(cells.items(), key=lambda x: (x[0][0], x[0][1])):
            eff = [r["best_effect"] for r in rs]
            cell = {"method": method, "n_pairs": n, "seeds": len(rs),
                    "effect_mean": statistics.fmean(eff),
                    "effect_std": statistics.pstdev(eff) if len(eff) > 1 else 0.0,
                    "effect_min": min(eff), "effect_max": max(eff),
                    "kl_at_best_mean": statistics.fmean(r["best_kl"] for r in rs)}
            if all("cost" in r for r in rs):  # what obtaining the intervention took
                cell["seconds_mean"] = statistics.fmean(r["cost"]["seconds"] for r in rs)
                cell["cpu_seconds_mean"] = statistics.fmean(r["cost"].get("cpu_seconds", 0.0)
                                                            for r in rs)
                cell["peak_mb_mean"] = statistics.fmean(r["cost"]["peak_mb"] for r in rs)
                cell["peak_mb_max"] = max(r["cost"]["peak_mb"] for r in rs)
            if all("trained_kl" in r for r in rs):  # LoRA as trained (scale 1)
                cell["trained_effect_mean"] = statistics.fmean(r["trained_effect"] for r in rs)
                cell["trained_kl_mean"] = statistics.fmean(r["trained_kl"] for r in rs)
                cell["trained_within_budget"] = sum(r["trained_kl"] <= self.settings["kl_budget"]
                                                    for r in rs)
            out.append(cell)
        return out


def default_layer(model: Model) -> int:
    """A third of the depth (block 10 of 30 on the default model, where mean-difference concept
    vectors from synthetic pairs steered best in a layer scan; see docs/studies/method-comparison.md)."""
    return model.n_layers // 3


def load_result(path: str | Path) -> CompareResult:
    """Read a ``results.json`` back (to re-render plots and the report)."""
    data = json.loads(Path(path).read_text())
    data.pop("summary", None)
    return CompareResult(**data)
