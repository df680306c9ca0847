"""The refusal direction end to end (Arditi et al. 2024): a model that refuses
(:mod:`avec.refusal.data` + :mod:`avec.finetune`), direction selection
(:mod:`avec.refusal.select`), evaluation (:mod:`avec.refusal.evaluate`) and the whole study in
one call (:mod:`avec.refusal.pipeline`). Ablation and weight orthogonalization live in
:mod:`avec.ablation` and :mod:`avec.orthogonalize`."""

from avec.refusal.data import REFUSAL_SUBSTRINGS, is_refusal, refusal_rate

__all__ = ["REFUSAL_SUBSTRINGS", "is_refusal", "refusal_rate"]
