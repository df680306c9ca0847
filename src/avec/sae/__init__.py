"""Sparse autoencoders: the model (SAELens convention), SAELens-format I/O, TopK training,
and steering with SAE latents."""

from __future__ import annotations

from avec.sae.io import load_sae, save_sae
from avec.sae.model import (
    SAEConfig,
    SAEError,
    SparseAutoencoder,
    geometric_median,
    layer_from_hook_name,
)
from avec.sae.steer import feature_vector, steer_features
from avec.sae.train import SAETrainConfig, sae_metrics, train_sae

__all__ = ["SAEConfig", "SAEError", "SAETrainConfig", "SparseAutoencoder", "feature_vector",
           "geometric_median", "layer_from_hook_name", "load_sae", "sae_metrics", "save_sae",
           "steer_features", "train_sae"]
