"""Changing a model's activations with a direction: the ``steer`` context manager (add, ablate,
clamp; per-row coefficients), ablation at every block, and weight orthogonalization."""
