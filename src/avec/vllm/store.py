"""The vectors a vLLM server can steer with: the files of one directory, loaded with avec's own
checked readers (``.safetensors`` avec vectors, ``.gguf`` control vectors), named by stem."""

from __future__ import annotations

import hashlib
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from avec.errors import AvecError
from avec.vector import SteeringVector, load_vector

SUFFIXES = (".safetensors", ".gguf")


def check_flat(vector: SteeringVector, where: str) -> None:
    """The vLLM backend steers with ``[d]`` directions; refuse ``[T, d]`` blocks (ActAdd)."""
    if any(v.dim() != 1 for v in vector.directions.values()):
        raise AvecError(f"{where}: the vLLM backend steers with [d] directions; this vector "
                        f"holds per-position [T, d] blocks (ActAdd): use --backend hf")


@contextmanager
def vectors_from(directory: str | Path) -> Iterator[None]:
    """``$AVEC_VLLM_VECTORS`` set to ``directory`` inside the block (vLLM processes started
    there inherit it), restored after."""
    from avec.vllm import VECTORS_ENV

    previous = os.environ.get(VECTORS_ENV)
    os.environ[VECTORS_ENV] = str(directory)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(VECTORS_ENV, None)
        else:
            os.environ[VECTORS_ENV] = previous


@dataclass
class StoredVector:
    vector: SteeringVector
    digest: str  # sha256 of the file: part of the prefix-cache salt
    # per (device, dtype): each layer's (direction, unit direction), made once, reused per step
    cast: dict[tuple[str, torch.dtype], dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict)

    def at(self, layer: int, device: torch.device, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s direction and its unit vector, on ``device`` in ``dtype``."""
        key = (str(device), dtype)
        if key not in self.cast:
            self.cast[key] = {}
            for L, v in self.vector.directions.items():
                v = v.to(device=device, dtype=dtype)
                self.cast[key][L] = (v, v / v.norm())
        return self.cast[key][layer]


class VectorStore:
    """Vectors by name from ``directory``; a name not seen yet triggers one re-scan, so files
    added while the server runs become usable (a changed file gets a new digest)."""

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory else None
        self._vectors: dict[str, StoredVector] = {}
        self._lock = threading.Lock()
        self._scanned: dict[str, float] = {}
        if self.directory is not None:
            if not self.directory.is_dir():
                raise AvecError(f"$AVEC_VLLM_VECTORS={self.directory} is not a directory; "
                                f"point it at a folder of .safetensors / .gguf vector files")
            self.rescan()

    @classmethod
    def from_env(cls) -> "VectorStore":
        from avec.vllm import VECTORS_ENV

        return cls(os.environ.get(VECTORS_ENV) or None)

    def rescan(self) -> None:
        if self.directory is None:
            return
        with self._lock:
            for path in sorted(self.directory.iterdir()):
                if path.suffix not in SUFFIXES or not path.is_file():
                    continue
                mtime = path.stat().st_mtime
                if self._scanned.get(path.name) == mtime:
                    continue
                data = path.read_bytes()
                vec = load_vector(path)
                check_flat(vec, str(path))
                self._vectors[path.stem] = StoredVector(vec, hashlib.sha256(data).hexdigest())
                self._scanned[path.name] = mtime

    def get(self, name: str) -> StoredVector | None:
        if name not in self._vectors:
            self.rescan()
        return self._vectors.get(name)

    def names(self) -> list[str]:
        return sorted(self._vectors)
