"""Top-activating examples of any direction: which texts and tokens project most on it.

The same pipeline interpretability work uses for SAE features, for every direction: per-token
activations at one layer, projected on the unit direction, ranked, and shown as highlighted
HTML.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from avec.directions.activations import layer_outputs
from avec.errors import DataError
from avec.models.model import Model
from avec.report import html_page


@dataclass(frozen=True)
class TopExample:
    text_index: int
    token_index: int  # the token with the largest projection in this text
    score: float  # projection of that token's activation on the unit direction
    tokens: list[str]
    scores: list[float]  # projection of every token


@torch.inference_mode()
def token_projections(model: Model, texts: Sequence[str], direction: torch.Tensor, layer: int,
                      *, max_tokens: int = 128, batch_size: int = 16,
                      progress: bool = False) -> list[tuple[list[int], list[float]]]:
    """For each text (truncated to ``max_tokens``), its token ids and projections at ``layer``."""
    layer = model.check_layers([layer])[0]
    if direction.dim() != 1 or direction.shape[0] != model.d_model:
        raise ValueError(f"direction must be a [{model.d_model}] vector, got {tuple(direction.shape)}")
    unit = (direction.float() / direction.float().norm()).to(model.device, model.dtype)
    out: list[tuple[list[int], list[float]]] = [([], []) for _ in texts]  # texts with no tokens
    for i, text_ids, hidden in layer_outputs(model, texts, layer, max_tokens=max_tokens,
                                             batch_size=batch_size, progress=progress,
                                             desc="projections"):
        out[i] = (text_ids, (hidden @ unit).float().cpu().tolist())
    return out


def peak_token(scores: Sequence[float], skip_first: int = 1) -> int:
    """Index of the highest score from index ``skip_first`` on (from 0 when the text is not
    longer than that): the token a text is ranked by."""
    start = skip_first if len(scores) > skip_first else 0
    return max(range(start, len(scores)), key=scores.__getitem__)


def top_examples(model: Model, texts: Sequence[str], direction: torch.Tensor, layer: int, *,
                 k: int = 20, max_tokens: int = 128, skip_first: int = 1,
                 progress: bool = False) -> list[TopExample]:
    """The ``k`` texts whose highest-projecting token projects most on ``direction``.

    ``skip_first`` ignores the first tokens of each text when ranking (the first position of a
    transformer is an attention sink with outsized activations).
    """
    projections = token_projections(model, texts, direction, layer, max_tokens=max_tokens,
                                     progress=progress)
    ranked = []
    for i, (ids, scores) in enumerate(projections):
        best = peak_token(scores, skip_first)
        tokens = [model.tokenizer.decode([t]) for t in ids]
        ranked.append(TopExample(i, best, scores[best], tokens, scores))
    ranked.sort(key=lambda e: -e.score)
    return ranked[:k]


def load_corpus(paths: Sequence[str | Path]) -> list[str]:
    """Texts from files: ``.txt`` split at blank lines, ``.json``/``.jsonl`` as prompt files."""
    from avec.data.pairs import load_prompts
    from avec.data.textfile import check_text, read_text

    texts: list[str] = []
    for path in map(Path, paths):
        if path.suffix in (".json", ".jsonl"):
            texts.extend(load_prompts(path))
        else:
            text = read_text(path)
            chunks = [c.strip() for c in text.split("\n\n")]
            texts.extend(check_text(c, f"{path}: paragraph {i + 1}")
                         for i, c in enumerate(c for c in chunks if c))
    if not texts:
        raise DataError("the corpus is empty")
    return texts


def render_html(examples: Sequence[TopExample], title: str, subtitle: str = "") -> str:
    """A self-contained page: each example's tokens shaded by their projection."""
    peak = max((abs(s) for e in examples for s in e.scores[1:] or e.scores), default=1.0) or 1.0
    rows = []
    for rank, ex in enumerate(examples, start=1):
        spans = []
        for j, (tok, s) in enumerate(zip(ex.tokens, ex.scores)):
            alpha = min(1.0, abs(s) / peak)
            color = f"rgba(230,120,0,{alpha:.2f})" if s > 0 else f"rgba(40,110,220,{alpha:.2f})"
            cls = ' class="peak"' if j == ex.token_index else ""
            spans.append(f'<span{cls} style="background:{color}" title="{s:.3f}">'
                         f"{html.escape(tok)}</span>")
        rows.append(f'<tr><td class="n">{rank}</td><td class="n">{ex.score:.2f}</td>'
                    f'<td class="n">{html.escape(ex.tokens[ex.token_index])!s}</td>'
                    f'<td class="t">{"".join(spans)}</td></tr>')
    return html_page(title, f"""<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>
<p>Orange: projects positively on the direction; blue: negatively; hover a token for its value;
the outlined token is the text's maximum.</p>
<table><tr><th>#</th><th>max</th><th>token</th><th>text</th></tr>{''.join(rows)}</table>""",
                     css="span.peak{outline:2px solid #a33}")
