"""Named steering vectors a server can apply: loaded from a directory or uploaded.

Every vector goes through :func:`avec.vector.load_vector` with the served model, so width,
layer range, finiteness and metadata are checked, and nothing is ever unpickled.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

from avec.errors import VectorFileError
from avec.models.model import Model
from avec.vector import SteeringVector, load_vector

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SUFFIXES = (".safetensors", ".gguf")
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024


class RegistryError(ValueError):
    """A registry operation was refused; ``status`` is the HTTP status that fits it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class VectorRegistry:
    """Thread-safe mapping name -> :class:`SteeringVector` for one model."""

    def __init__(self, model: Model, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.model = model
        self.max_file_bytes = max_file_bytes
        self._vectors: dict[str, SteeringVector] = {}
        self._lock = threading.Lock()

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise RegistryError(f"invalid vector name {name!r}: use 1-64 characters from "
                                f"A-Z a-z 0-9 _ . -")
        return name

    def load_dir(self, directory: str | Path) -> list[str]:
        """Load every ``*.safetensors`` / ``*.gguf`` file in ``directory``, named by its stem.

        A file that does not load raises :class:`VectorFileError` naming it. Returns the names.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise VectorFileError(f"{directory}: not a directory of vector files")
        names = []
        for path in sorted(directory.iterdir()):
            if path.suffix.lower() not in SUFFIXES or not path.is_file():
                continue
            name = self.check_name(path.stem)
            vec = load_vector(path, self.model)
            with self._lock:
                self._vectors[name] = vec
            names.append(name)
        return names

    def add(self, name: str, data: bytes, filename: str = "upload.safetensors",
            *, replace: bool = True) -> SteeringVector:
        """Validate uploaded file bytes (via a temporary file and ``load_vector``) and register
        them as ``name``. ``filename``'s suffix picks the format (.gguf, else safetensors)."""
        self.check_name(name)
        if len(data) > self.max_file_bytes:
            raise RegistryError(f"vector file is {len(data)} bytes; the limit is "
                                f"{self.max_file_bytes}", status=413)
        if not data:
            raise RegistryError("the uploaded vector file is empty")
        suffix = ".gguf" if str(filename).lower().endswith(".gguf") else ".safetensors"
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="avec-upload-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            try:
                vec = load_vector(tmp, self.model)
            except VectorFileError as exc:
                raise RegistryError(str(exc).replace(tmp, f"upload {name!r}")) from None
            except Exception as exc:  # a parser error we do not know: still a bad upload
                raise RegistryError(f"upload {name!r} is not a valid vector file "
                                    f"({type(exc).__name__}: {exc})") from None
        finally:
            os.unlink(tmp)
        with self._lock:
            if not replace and name in self._vectors:
                raise RegistryError(f"a vector named {name!r} already exists", status=409)
            self._vectors[name] = vec
        return vec

    def put(self, name: str, vector: SteeringVector) -> None:
        """Register an in-memory vector (checked against the model)."""
        self.check_name(name)
        vector.check_model(self.model)
        with self._lock:
            self._vectors[name] = vector

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._vectors:
                raise RegistryError(f"no vector named {name!r}", status=404)
            del self._vectors[name]

    def get(self, name: str) -> SteeringVector:
        with self._lock:
            vec = self._vectors.get(name)
            known = sorted(self._vectors)
        if vec is None:
            raise RegistryError(f"unknown vector {name!r}; known vectors: {known} "
                                f"(GET /v1/vectors lists them)", status=404)
        return vec

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._vectors)

    def list(self) -> list[dict[str, Any]]:
        """Metadata of every vector: name, layers, width, method, per-layer norms."""
        with self._lock:
            items = sorted(self._vectors.items())
        return [describe(n, v) for n, v in items]


def describe(name: str, vec: SteeringVector) -> dict[str, Any]:
    """The JSON summary of one registered vector."""
    info = vec.describe()
    return {"name": name, "layers": info["layers"], "width": vec.width,
            "method": info.get("method"), "norms": info["norms"]}
