"""Compare extraction methods on generation and A/B tasks at equal pairs and side-effect budget:
:mod:`~avec.studies.compare.settings` (what a comparison is), :mod:`~avec.studies.compare.run`
(the protocol), :mod:`~avec.studies.compare.finetuned` (the LoRA rows and LoRA + steering),
:mod:`~avec.studies.compare.cost` (seconds and memory to obtain an intervention),
:mod:`~avec.studies.compare.measure` (what every row shares: subsets, scaling, effects, the best
within budget),
:mod:`~avec.studies.compare.report` (its files)."""

from avec.studies.compare.finetuned import FINETUNE_METHODS
from avec.studies.compare.report import write_outputs
from avec.studies.compare.run import REGISTRY, compare
from avec.studies.compare.settings import (DEFAULT_METHODS, CompareResult, CompareSettings, Task,
                                           default_layer, load_result)

__all__ = ["DEFAULT_METHODS", "FINETUNE_METHODS", "REGISTRY", "CompareResult", "CompareSettings",
           "Task", "compare", "default_layer", "load_result", "write_outputs"]
