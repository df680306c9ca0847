"""Check, in a child process, that the installed llama.cpp can decode before trusting it
in-process.

llama-cpp-python compiles llama.cpp on the machine that installs it. A build made for another
CPU (``GGML_NATIVE=ON`` targets the build machine's own instruction set; seen: AMX kernels
segfault on the first decode of an AVX-512/AMX machine) or a damaged install does not raise a
Python error: it kills the process. :func:`probe` loads a ``.gguf`` file and decodes a few
tokens in a subprocess, so such a crash becomes a :class:`ProbeResult` that says what crashed
and how to rebuild, and the calling process (a test session, a server) lives on.

    python -m avec.generation.llamacpp_probe [MODEL.gguf]     # exit 0 when llama.cpp decodes
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REBUILD_HINT = ("rebuild llama-cpp-python for a portable CPU baseline: `make llama-clean llama` "
                "in an avec checkout, or `CMAKE_ARGS=-DGGML_NATIVE=OFF pip install "
                "--no-cache-dir --force-reinstall --no-deps llama-cpp-python`")

# What the child runs: load, tokenize with llama.cpp's own tokenizer (no transformers import),
# decode ``n`` tokens, check the logits are finite.
_CHILD = """
import math, sys
import llama_cpp
path, n = sys.argv[1], int(sys.argv[2])
llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=2, verbose=False)
ids = llm.tokenize(b"The quick brown fox jumps over the lazy dog again and again.")[:n]
llm.eval(ids)
row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
if not all(math.isfinite(row[i]) for i in range(llm.n_vocab())):
    sys.exit("llama.cpp decoded, but the logits are not finite")
print(f"ok {len(ids)} tokens")
"""


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe: ``ok`` when the child decoded; else ``message`` says what
    failed (the signal that killed the child, or its error) and how to rebuild."""

    ok: bool
    message: str
    returncode: int | None


def _installed_at() -> str:
    spec = importlib.util.find_spec("llama_cpp")  # locates the package without running it
    return "not installed" if spec is None or spec.origin is None else \
        str(Path(spec.origin).parent)


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join(kept)


def probe(model_path: str | os.PathLike[str], *, n_tokens: int = 8,
          timeout: float = 300.0) -> ProbeResult:
    """Load ``model_path`` with llama.cpp and decode ``n_tokens`` prompt tokens in a child
    process (the same Python interpreter); never raises for what happens in the child."""
    if importlib.util.find_spec("llama_cpp") is None:
        return ProbeResult(False, "llama-cpp-python is not installed: `make llama` in an avec "
                                  "checkout, or `pip install 'llama-cpp-python>=0.3.30'`", None)
    where = _installed_at()
    cmd = [sys.executable, "-c", _CHILD, str(model_path), str(int(n_tokens))]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"llama.cpp did not decode {n_tokens} tokens of {model_path} "
                                  f"within {timeout:.0f} s (llama_cpp at {where}); "
                                  f"{REBUILD_HINT}", None)
    if done.returncode == 0:
        return ProbeResult(True, done.stdout.strip(), 0)
    if done.returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-done.returncode).name}"
        except ValueError:
            how = f"was killed by signal {-done.returncode}"
        why = ("the native library was probably compiled for another CPU (GGML_NATIVE=ON "
               "builds for the build machine's instruction set) or is damaged")
    else:
        how = f"failed with exit code {done.returncode}"
        why = _tail(done.stderr) or "no error output"
    return ProbeResult(False, f"llama.cpp {how} while loading {model_path} and decoding "
                              f"{n_tokens} tokens in a child process (llama_cpp at {where}): "
                              f"{why}. To fix: {REBUILD_HINT}", done.returncode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m avec.generation.llamacpp_probe",
        description="Check in a child process that llama.cpp loads a GGUF file and decodes.")
    parser.add_argument("model", nargs="?", help="a .gguf file (default: the packaged "
                                                   "SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=8, help="prompt tokens to decode (8)")
    args = parser.parse_args(argv)
    if args.model is None:
        from avec.models.loading import default_model_path

        args.model = str(default_model_path())
    result = probe(args.model, n_tokens=args.tokens)
    print(("llama.cpp probe: " + result.message) if result.ok else
          f"llama.cpp probe FAILED: {result.message}", file=sys.stdout if result.ok else
          sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
