"""Finding a condition (``avec condition fit``): the direction that separates two prompt sets at a
layer, and the comparator and threshold that separate them best, chosen by F1 on held-in prompts
and checked on held-out ones, over a scan of layers (as CAST's grid search does).

Each prompt is read as a request is: chat-templated when the model has a template, its mean
block-L output over the tokens after the first (:func:`prompt_means`, the value a conditional
entry computes at serving time). The direction is the mean over the positive prompts minus the
mean over the negative ones (held-in prompts only).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from avec.directions.activations import length_batches, pad_batch
from avec.intervene.conditions import Leaf, compare, condition_vector
from avec.models.context import check_lengths
from avec.models.model import Model
from avec.vector import SteeringVector


@torch.inference_mode()
def prompt_means(model: Model, prompts: Sequence[str], layers: Sequence[int], *,
                 chat: bool | None = None, batch_size: int = 16, progress: bool = False
                 ) -> dict[int, torch.Tensor]:
    """``{layer: [len(prompts), d]}``: each prompt's mean block-layer output over its tokens
    after the first, the prompt formatted as a request is (float32, CPU)."""
    ids = [model.prompt_ids(p, chat)[0] for p in prompts]
    check_lengths(model, [len(x) for x in ids], lambda i: f"prompt {i + 1}")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = {L: torch.zeros(len(ids), model.d_model) for L in layers}
    for rows in tqdm(length_batches(order, ids, batch_size), desc="prompts",
                     disable=not progress, leave=False):
        input_ids, mask, pos = pad_batch([ids[i] for i in rows], model.tokenizer.pad_token_id,
                                         "right", model.device)
        hidden = model.hf(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                          output_hidden_states=True).hidden_states
        keep = (mask.bool() & (pos >= 1)).unsqueeze(-1).float()
        count = keep.sum(1).clamp(min=1)
        for L in layers:
            means = (hidden[L + 1].float() * keep).sum(1) / count
            out[L][torch.tensor(rows)] = means.cpu()
    return out


@dataclass
class Separation:
    """How well a rule separates positives (True) from negatives (False)."""

    threshold: float
    op: str
    f1: float
    precision: float
    recall: float

    @staticmethod
    def of(values: torch.Tensor, labels: torch.Tensor, threshold: float, op: str
           ) -> "Separation":
        tp, fp, fn = _confusion(compare(values, op, threshold), labels)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return Separation(float(threshold), op, f1, precision, recall)


def _confusion(pred: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int]:
    """True positives, false positives and false negatives of boolean predictions."""
    return (int((pred & labels).sum()), int((pred & ~labels).sum()),
            int((~pred & labels).sum()))


def best_rule(values: torch.Tensor, labels: torch.Tensor) -> Separation:
    """The comparator and threshold with the highest F1 (ties: the larger margin) among
    thresholds halfway between consecutive values."""
    v = sorted(set(values.tolist()))
    cuts = [(a + b) / 2 for a, b in zip(v, v[1:])] or [v[0]]
    best: tuple[tuple[float, float], Separation] | None = None
    for t in cuts:
        margin = float((values - t).abs().min())
        for op in (">", "<"):
            sep = Separation.of(values, labels, t, op)
            key = (sep.f1, margin)
            if best is None or key > best[0]:
                best = (key, sep)
    assert best is not None
    return best[1]


def roc(values: torch.Tensor, labels: torch.Tensor, op: str) -> tuple[list[tuple[float, float]],
                                                                        float]:
    """ROC points (false-positive rate, true-positive rate) as the threshold sweeps, for the
    comparator ``op``, and the area under the curve."""
    score = values if op == ">" else -values
    order = torch.argsort(score, descending=True)
    pos, neg = int(labels.sum()), int((~labels).sum())
    points, tp, fp = [(0.0, 0.0)], 0, 0
    for i in order.tolist():
        tp, fp = tp + int(labels[i]), fp + int(not labels[i])
        points.append((fp / max(neg, 1), tp / max(pos, 1)))
    auc = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return points, auc


@dataclass
class LayerFit:
    """One scanned layer: its rule's held-in fit, its cross-validated F1 within the held-in
    prompts (what chooses the layer) and its held-out scores."""

    layer: int
    held_in: Separation
    held_out: Separation
    auc_held_out: float
    cv_f1: float = 0.0


def _rule_at(means: torch.Tensor, pos: list[int], neg: list[int], metric: str
             ) -> tuple[torch.Tensor, torch.Tensor, Separation]:
    """The direction of ``pos`` minus ``neg`` (row indices of ``means``), every row's value on
    it, and the best rule on those rows."""
    direction = means[torch.tensor(pos)].mean(0) - means[torch.tensor(neg)].mean(0)
    values = Leaf(direction, 0, 0.0, ">", metric).values(means)
    idx = torch.tensor(pos + neg)
    labels = torch.tensor([True] * len(pos) + [False] * len(neg))
    return direction, values, best_rule(values[idx], labels)


def cross_validated_f1(means: torch.Tensor, pos: list[int], neg: list[int], metric: str,
                       folds: int = 4, seed: int = 0) -> float:
    """Pooled F1 of rules fitted on ``folds - 1`` folds of ``pos``/``neg`` and applied to the
    remaining one (stratified, seeded): how well the layer separates prompts it was not fitted
    on, without touching the held-out set. With fewer than 2 prompts per fold and class, the
    held-in fit's own F1."""
    k = min(folds, len(pos), len(neg))
    if k < 2:
        return _rule_at(means, pos, neg, metric)[2].f1
    rng = random.Random(seed)
    p, n = list(pos), list(neg)
    rng.shuffle(p)
    rng.shuffle(n)
    preds, truth = [], []
    for f in range(k):
        p_val, n_val = p[f::k], n[f::k]
        p_fit = [i for i in p if i not in p_val]
        n_fit = [i for i in n if i not in n_val]
        _, values, rule = _rule_at(means, p_fit, n_fit, metric)
        val = torch.tensor(p_val + n_val)
        labels = torch.tensor([True] * len(p_val) + [False] * len(n_val))
        preds.append(compare(values[val], rule.op, rule.threshold))
        truth.append(labels)
    tp, fp, fn = _confusion(torch.cat(preds), torch.cat(truth))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


@dataclass
class ConditionFit:
    """The chosen layer's condition and every layer's scores."""

    layer: int
    metric: str
    direction: torch.Tensor
    held_in: Separation
    held_out: Separation
    auc_held_out: float
    roc_held_out: list[tuple[float, float]]
    scan: list[LayerFit]
    split: dict[str, list[int]] = field(default_factory=dict)

    @property
    def cv_f1(self) -> float:
        """The chosen layer's cross-validated F1 (what chose it)."""
        return next(s.cv_f1 for s in self.scan if s.layer == self.layer)

    @property
    def leaf(self) -> Leaf:
        return Leaf(self.direction, self.layer, self.held_in.threshold, self.held_in.op,
                    self.metric)

    def vector(self, model: Model) -> SteeringVector:
        """The condition vector file's content (the rule and its scores in the metadata)."""
        return condition_vector(
            self.direction, self.layer, self.held_in.threshold, op=self.held_in.op,
            metric=self.metric, metadata={"method": "condition mean_diff",
                                          "model": model.identity()},
            fit={"held_in_f1": round(self.held_in.f1, 4),
                 "cv_f1": round(self.cv_f1, 4),
                 "held_out": {k: round(v, 4) for k, v in asdict(self.held_out).items()
                              if k in ("f1", "precision", "recall")},
                 "held_out_auc": round(self.auc_held_out, 4),
                 "positives": len(self.split.get("positive_in", [])),
                 "negatives": len(self.split.get("negative_in", []))})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["direction_norm"] = float(self.direction.norm())
        out.pop("direction")
        return out


def _split(n: int, fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    k = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[k:]), sorted(order[:k])


def fit(model: Model, positive: Sequence[str], negative: Sequence[str], layers: Sequence[int],
        *, metric: str = "cosine", held_out: float = 0.25, seed: int = 0,
        chat: bool | None = None, progress: bool = False) -> ConditionFit:
    """Fit a condition separating ``positive`` prompts (the condition holds) from ``negative``
    ones at each of ``layers``. Each layer's rule (the mean-difference direction, comparator
    and threshold with the best F1) is fitted on the held-in prompts; the layer with the best
    4-fold cross-validated F1 within the held-in prompts wins (ties: the better held-in F1,
    then the earlier layer), so the held-out prompts only measure the choice."""
    if len(positive) < 2 or len(negative) < 2:
        raise ValueError("give at least 2 positive and 2 negative prompts (held-in and "
                         "held-out)")
    if not (isinstance(held_out, (int, float)) and 0 < held_out < 1):
        raise ValueError(f"held_out: the fraction of each set held out, between 0 and 1 "
                         f"(exclusive), got {held_out!r}")
    if metric not in ("cosine", "projection"):
        raise ValueError(f"metric {metric!r}: use cosine or projection")
    layers = model.check_layers(list(layers))
    rng = random.Random(seed)
    p_in, p_out = _split(len(positive), held_out, rng)
    n_in, n_out = _split(len(negative), held_out, rng)
    means = prompt_means(model, list(positive) + list(negative), layers, chat=chat,
                         progress=progress)
    labels = torch.tensor([True] * len(positive) + [False] * len(negative))
    idx_out = torch.tensor(p_out + [len(positive) + i for i in n_out])
    neg_in = [len(positive) + i for i in n_in]
    scan, best = [], None
    for L in layers:
        m = means[L]
        direction, values, rule = _rule_at(m, p_in, neg_in, metric)
        out_sep = Separation.of(values[idx_out], labels[idx_out], rule.threshold, rule.op)
        points, auc = roc(values[idx_out], labels[idx_out], rule.op)
        cv = cross_validated_f1(m, p_in, neg_in, metric, seed=seed)
        scan.append(LayerFit(L, rule, out_sep, auc, cv))
        key = (cv, rule.f1)
        if best is None or key > best[0]:
            best = (key, scan[-1], direction, points)
    assert best is not None
    _, chosen, direction, points = best
    return ConditionFit(chosen.layer, metric, direction, chosen.held_in, chosen.held_out,
                        chosen.auc_held_out, points, scan,
                        {"positive_in": p_in, "positive_out": p_out, "negative_in": n_in,
                         "negative_out": n_out})


__all__ = ["ConditionFit", "LayerFit", "Separation", "best_rule", "cross_validated_f1", "fit",
           "prompt_means", "roc"]
