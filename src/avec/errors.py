"""Exception types. Every avec error says what was wrong and how to fix it."""

from __future__ import annotations


class AvecError(Exception):
    """Base class for errors raised by avec."""


class DataError(AvecError, ValueError):
    """Contrast data or a prompt file is malformed (message names file and line)."""


class VectorFileError(AvecError, ValueError):
    """A steering-vector file is malformed, unsafe or for another model."""


class ModelLoadError(AvecError, RuntimeError):
    """A model could not be found, converted or loaded."""


class UnsupportedArchitectureError(AvecError, ValueError):
    """avec does not know where this architecture keeps its decoder blocks."""


class SteeringError(AvecError, ValueError):
    """An intervention does not fit the model or the batch it is applied to."""
