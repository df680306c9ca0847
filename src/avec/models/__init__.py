"""Loading models and finding their decoder blocks."""

from avec.models.adapters import ADAPTERS, ArchitectureAdapter, find_blocks
from avec.models.loading import default_model_path, load_model
from avec.models.model import Model

__all__ = ["ADAPTERS", "ArchitectureAdapter", "Model", "default_model_path", "find_blocks",
           "load_model"]
