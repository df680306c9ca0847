"""Metrics: numbers in, numbers out (A/B p(match), KL and perplexity, concept scores, sweeps,
top-activating examples)."""
