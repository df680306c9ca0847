"""avec: activation engineering for language models (and any torch module).

>>> import avec
>>> model = avec.load_model()                         # packaged SmolLM2-135M-Instruct
>>> vec = avec.extract(model, avec.load_pairs("pairs.jsonl"), layers=[14])
>>> with avec.steer(model, vec, coef=8.0):
...     print(avec.steered_completions(model, ["Tell me a story."])[0].text)
"""

from avec._version import __version__
from avec.intervene.ablation import ablate_direction
from avec.directions.activations import read_activations
from avec.data import ContrastPair, load_ab_pairs, load_jsonl_pairs, load_pairs, load_prompts
from avec.errors import (AvecError, DataError, ModelLoadError, SteeringError,
                         UnsupportedArchitectureError, VectorFileError)
from avec.directions.extract import extract
from avec.generation.hf import Completion, steered_completions
from avec.models import Model, load_model
from avec.models.modules import ModuleModel, difference_vector, read_sites
from avec.intervene.orthogonalize import orthogonalize_weights, save_orthogonalized
from avec.intervene.steer import Intervention, steer
from avec.intervene.conditions import AllOf, AnyOf, Leaf, Not, condition_vector
from avec.intervene.conditions import parse as parse_condition
from avec.intervene.condition_fit import ConditionFit
from avec.intervene.condition_fit import fit as fit_condition
from avec.vector import Recommendation, SteeringVector, load_vector
from avec.tuning import TuneConfig, TuneResult, tune

__all__ = [
    "AvecError", "Completion", "ContrastPair", "DataError", "Intervention", "Model",
    "ModelLoadError", "ModuleModel", "SteeringError", "SteeringVector", "UnsupportedArchitectureError",
    "VectorFileError", "__version__", "ablate_direction", "difference_vector", "extract", "load_ab_pairs",
    "load_jsonl_pairs", "load_model", "load_pairs", "load_prompts", "load_vector",
    "orthogonalize_weights", "read_activations", "read_sites", "save_orthogonalized", "steer",
    "steered_completions", "Recommendation", "TuneConfig", "TuneResult", "tune",
    "AllOf", "AnyOf", "ConditionFit", "Leaf", "Not", "condition_vector", "fit_condition",
    "parse_condition",
]
