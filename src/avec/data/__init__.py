"""Contrast pairs, A/B questions and prompt sets."""

from avec.data.pairs import (ContrastPair, load_ab_pairs, load_jsonl_pairs, load_pairs,
                             load_prompts, save_jsonl_pairs)
from avec.data.templates import join_prompt, pair_texts

__all__ = ["ContrastPair", "join_prompt", "load_ab_pairs", "load_jsonl_pairs", "load_pairs",
           "load_prompts", "pair_texts", "save_jsonl_pairs"]
