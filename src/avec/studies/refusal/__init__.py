"""The refusal direction end to end (Arditi et al. 2024): a model that refuses
(:mod:`avec.studies.refusal.data` + :mod:`avec.studies.refusal.finetune`), direction selection
(:mod:`avec.studies.refusal.select`), evaluation (:mod:`avec.studies.refusal.evaluate`) and the whole study in
one call (:mod:`avec.studies.refusal.pipeline`). Ablation and weight orthogonalization live in
:mod:`avec.intervene.ablation` and :mod:`avec.intervene.orthogonalize`."""

from avec.evaluate.refusal import REFUSAL_SUBSTRINGS, is_refusal, refusal_rate

__all__ = ["REFUSAL_SUBSTRINGS", "is_refusal", "refusal_rate"]
