"""A composition grid on a language model: greedy completions of every prompt with the vectors
applied together at every combination of their coefficients, each completion scored by text
judges (:class:`TextScore`).

A cell ``(c_1, ..., c_n)`` steers with ``c_1 v_1 + ... + c_n v_n``, each vector at its own
layers (a layer two vectors share gets the sum of both). All cells' rows run in shared batches
through :func:`avec.generation.hf.variant_completions`: rows of one prompt length form a batch,
each row with its own vector, without padding (unless asked), so the cell ``(0, ..., 0)`` is
exactly the unsteered model and a cell with one nonzero coefficient exactly that vector
alone."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from avec.evaluate.compose import ScoreGrid, check_axis, grid_cells
from avec.evaluate.concepts import EmbeddingJudge, keyword_rate
from avec.evaluate.refusal import is_refusal
from avec.generation.hf import variant_completions
from avec.intervene.steer import Positions
from avec.models.model import Model
from avec.vector import SteeringVector

SCORE_KINDS = ("keywords", "concept", "refusal")


@dataclass(frozen=True)
class TextScore:
    """A number per completion: ``keywords`` (1 if it contains one of ``keywords`` at a word
    start, case-insensitive, else 0), ``concept`` (cosine similarity to the description
    ``concept`` under the offline all-MiniLM-L6-v2 judge) or ``refusal`` (1 if it contains one
    of Arditi et al.'s refusal substrings)."""

    name: str
    kind: str
    keywords: tuple[str, ...] = ()
    concept: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SCORE_KINDS:
            raise ValueError(f"unknown score kind {self.kind!r}; use one of {list(SCORE_KINDS)}")
        if self.kind == "keywords" and not self.keywords:
            raise ValueError(f"score {self.name!r}: keywords needs at least one word")
        if self.kind == "concept" and not self.concept.strip():
            raise ValueError(f"score {self.name!r}: concept needs a description")

    def judge(self, texts: Sequence[str], embedder: EmbeddingJudge | None = None) -> list[float]:
        if self.kind == "keywords":
            return [keyword_rate([t], self.keywords) for t in texts]
        if self.kind == "refusal":
            return [float(is_refusal(t)) for t in texts]
        return (embedder or EmbeddingJudge()).scores(texts, self.concept)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.keywords:
            out["keywords"] = list(self.keywords)
        if self.concept:
            out["concept"] = self.concept
        return out


def parse_score(spec: str) -> TextScore:
    """``[NAME=]keywords:w1,w2,...``, ``[NAME=]concept:DESCRIPTION`` or ``[NAME=]refusal``
    (the name defaults to the kind and its argument, e.g. ``keywords:ocean,sea``)."""
    head, _, _ = spec.partition(":")
    name = ""
    if "=" in head:
        name, spec = spec.split("=", 1)
        name = name.strip()
        if not name:
            raise ValueError(f"score {spec!r}: the name before '=' is empty")
    kind, colon, arg = spec.partition(":")
    kind = kind.strip()
    if kind not in SCORE_KINDS:
        raise ValueError(f"score {spec!r}: use keywords:w1,w2, concept:TEXT or refusal "
                         f"(optionally NAME=... before it)")
    if kind == "refusal":
        if arg.strip():
            raise ValueError(f"score {spec!r}: refusal takes no argument")
        return TextScore(name or "refusal", "refusal")
    if not colon or not arg.strip():
        raise ValueError(f"score {spec!r}: {kind} needs an argument after ':'")
    if kind == "keywords":
        words = tuple(w.strip() for w in arg.split(",") if w.strip())
        return TextScore(name or f"keywords:{','.join(words)}", kind, keywords=words)
    return TextScore(name or f"concept:{arg.strip()}", kind, concept=arg.strip())


def combine(vectors: Sequence[SteeringVector], cell: Sequence[float]) -> SteeringVector | None:
    """``sum_j c_j v_j`` over the nonzero coefficients (``None`` when all are 0), over the
    union of the vectors' layers."""
    out: SteeringVector | None = None
    for vec, c in zip(vectors, cell):
        if c == 0:
            continue
        term = vec * float(c)
        out = term if out is None else out + term
    if out is not None:
        out.metadata.clear()
        out.metadata["method"] = "composition"
    return out


@dataclass
class LanguageGrid:
    """A grid of scores and what produced it: a few completions per cell (``samples``: the
    first prompts'), the number of generated rows, the wall time and the process's CPU time
    (all threads; a fairer measure on a shared machine)."""

    grid: ScoreGrid
    samples: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def language_grid(model: Model, vectors: Mapping[str, SteeringVector],
                  coefs: Sequence[Sequence[float]], scores: Sequence[TextScore],
                  targets: Sequence[str], prompts: Sequence[str], *, max_new_tokens: int = 40,
                  chat: bool | None = None, positions: Positions = "all", batch_size: int = 32,
                  pad: bool = False, samples: int = 4, progress: bool = False) -> LanguageGrid:
    """Score every prompt's greedy completion in every cell of the grid.

    ``vectors`` maps names to vectors already restricted to the layers each steers;
    ``coefs[j]`` is vector j's axis (containing 0); ``targets[j]`` names the score of
    ``scores`` that vector j is meant to move. ``pad``: prompts of different lengths share
    left-padded batches (far fewer passes; logits equal the unpadded ones within float
    tolerance). Rows go prompt by prompt, so with ``batch_size`` a multiple of the number of
    cells every cell of a prompt sits in the same batch, with the same padding."""
    names = list(vectors)
    vecs = [vectors[n] for n in names]
    shapes = {n: tuple(v.shape) for n, v in vectors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the vectors have different shapes {shapes}; a per-position (ActAdd) "
                         f"block and a single direction cannot be added together")
    if not prompts:
        raise ValueError("no prompts to generate from")
    known = [s.name for s in scores]
    if len(set(known)) != len(known):
        raise ValueError(f"score names repeat: {known}; name them NAME=...")
    missing = [t for t in targets if t not in known]
    if missing:
        raise ValueError(f"target score(s) {missing} are not among the scores {known}")
    axes = [check_axis(a, f"coefficients of {n!r}") for n, a in zip(names, coefs)]
    cells = grid_cells(axes)
    t0, cpu0 = time.perf_counter(), time.process_time()
    combined = [combine(vecs, cell) for cell in cells]
    variants = [(v, 0.0 if v is None else 1.0) for v in combined]
    texts = variant_completions(model, prompts, variants, positions=positions,
                                max_new_tokens=max_new_tokens, chat=chat,
                                batch_size=batch_size, pad=pad, progress=progress)
    embedder = EmbeddingJudge() if any(s.kind == "concept" for s in scores) else None
    flat = [t for row in texts for t in row]
    judged = {s.name: s.judge(flat, embedder) for s in scores}
    n = len(prompts)
    per_cell = [{s: judged[s][k * n:(k + 1) * n] for s in judged} for k in range(len(cells))]
    grid = ScoreGrid.from_cells(names, axes, targets, per_cell)
    kept = [{"coefs": list(cell), "completions": [{"prompt": p, "text": t}
                                                  for p, t in zip(prompts[:samples],
                                                                  row[:samples])]}
            for cell, row in zip(cells, texts)]
    return LanguageGrid(grid, kept, rows=len(cells) * n, seconds=time.perf_counter() - t0,
                        cpu_seconds=time.process_time() - cpu0)
