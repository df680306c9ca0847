"""Fixtures: tiny random models of several families (no downloads) and the real default model."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from avec.models import Model
from avec.vllm import vllm_available

# tests/vllm needs vLLM, which lives in its own environment (.venv-vllm: vLLM pins an older
# transformers than avec's dev set-up); `make test` runs that folder there after this suite
collect_ignore = [] if vllm_available() else ["vllm"]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB = 260
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer(chat: bool = True, merges: tuple[tuple[str, str], ...] = ()):
    """A byte-level tokenizer built in memory: 256 byte tokens + <eos>, <pad>, then one token
    per merge (at most 2 fit the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for j, (a, b) in enumerate(merges):  # ids 258, 259 (256, 257 are <eos>, <pad>)
        vocab[a + b] = 258 + j
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=256, bos_token_id=256,
                  eos_token_id=256, pad_token_id=257)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **common)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, **common)
    if family == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=8, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **common)
    if family == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=256,
                            bos_token_id=256, eos_token_id=256, pad_token_id=257)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox", "gpt2"]
CORE_FAMILIES = ["llama", "gemma3", "gpt2", "gpt_neox", "phi3"]


def make_tiny(family: str, seed: int = 0, chat: bool = True,
              merges: tuple[tuple[str, str], ...] = ()) -> Model:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so steering effects show
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return Model.from_hf(hf, byte_tokenizer(chat, merges), name=f"tiny-{family}")


@pytest.fixture(scope="session")
def tiny_llama() -> Model:
    return make_tiny("llama")


@pytest.fixture(scope="session", params=CORE_FAMILIES)
def tiny_any(request: pytest.FixtureRequest) -> Model:
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def real_model() -> Model:
    from avec.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; tests expect ../shared/data "
                    f"beside the repository")
    return SHARED_DATA


@contextlib.contextmanager
def live_server(app: Any, timeout: float = 15.0) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yield its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a Hugging Face folder (for the command line)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny = make_tiny("llama")
    tiny.hf.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    """Two contrast pairs in a JSONL file."""
    from avec.data import ContrastPair, save_jsonl_pairs

    path = tmp_path / "pairs.jsonl"
    save_jsonl_pairs([ContrastPair("I love this", "I hate this"),
                      ContrastPair("wonderful day", "awful day")], path)
    return path
