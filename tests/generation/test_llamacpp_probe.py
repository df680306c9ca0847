"""The llama.cpp probe: a crash or a damaged install in the child process becomes a clear
error with the rebuild command, and this process lives on. Fake ``llama_cpp`` packages stand
in for broken builds (the real build is probed by tests/test_llamacpp.py)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from avec.generation.llamacpp import LlamaCppModel
from avec.generation.llamacpp_probe import main, probe
from avec.errors import ModelLoadError
from avec.models.loading import default_model_path

FAKES = {
    "segfault": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
    "empty library": "raise RuntimeError(\"Failed to load shared library 'libllama.so': "
                     "libllama.so: file too short\")\n",
}


def fake_llama_cpp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    pkg = tmp_path / "fake" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", str(pkg.parent))  # the child imports the fake first


def test_a_crash_in_the_child_is_reported_with_the_rebuild_command(tmp_path, monkeypatch):
    fake_llama_cpp(tmp_path, monkeypatch, FAKES["segfault"])
    result = probe(default_model_path())
    assert not result.ok and result.returncode == -signal.SIGSEGV
    assert "killed by SIGSEGV" in result.message
    assert "make llama-clean llama" in result.message and "GGML_NATIVE=OFF" in result.message


def test_a_library_that_does_not_load_is_reported_with_its_error(tmp_path, monkeypatch):
    fake_llama_cpp(tmp_path, monkeypatch, FAKES["empty library"])
    result = probe(default_model_path())
    assert not result.ok and result.returncode == 1
    assert "file too short" in result.message and "make llama-clean llama" in result.message


def test_load_raises_instead_of_crashing(tmp_path, monkeypatch):
    fake_llama_cpp(tmp_path, monkeypatch, FAKES["segfault"])
    with pytest.raises(ModelLoadError, match="killed by SIGSEGV"):
        LlamaCppModel.load()


def test_module_command_exit_codes(tmp_path, monkeypatch, capsys):
    fake_llama_cpp(tmp_path, monkeypatch, FAKES["segfault"])
    assert main([str(default_model_path())]) == 1
    assert "llama.cpp probe FAILED" in capsys.readouterr().err

