"""Directional ablation everywhere (run time) and weight orthogonalization (Arditi et al. 2024).

The orthogonalized checkpoint, reloaded with plain transformers, must compute what the original
model computes under ``ablate_direction``; under ablation no block output has a component
along the direction.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from avec.intervene.ablation import ablate_direction, projection, residual_writers
from avec.errors import SteeringError, UnsupportedArchitectureError
from avec.models import Model
from avec.intervene.orthogonalize import METADATA_FILE, orthogonalize_weights, save_orthogonalized
from conftest import make_tiny, tiny_config

FOLDABLE = ["llama", "llama_tied", "qwen2", "phi3", "phi1", "gpt2", "gpt_neox",
            "gpt_neox_serial", "gemma1"]


def build(name: str, seed: int = 0) -> Model:
    """A tiny random model: conftest's families plus tied-embedding Llama, GPT-NeoX with the
    sequential residual, Phi 1 (parallel block, ``dense``/``fc2`` with biases) and Gemma 1
    (sqrt(d)-scaled, tied embeddings, no sandwich norms)."""
    import transformers as tf

    common = {"vocab_size": 260, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 256,
              "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 257}

    if name == "llama_tied":
        config = tiny_config("llama")
        config.tie_word_embeddings = True
    elif name == "gpt_neox_serial":
        config = tiny_config("gpt_neox")
        config.use_parallel_residual = False
    elif name == "gemma1":
        config = tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **common)
    elif name == "phi1":
        config = tf.PhiConfig(**common)
    else:
        return make_tiny(name, seed=seed)
    from conftest import byte_tokenizer

    torch.manual_seed(seed)
    hf = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return Model.from_hf(hf, byte_tokenizer(), name=f"tiny-{name}")


def direction(d: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 3.0


def input_ids(batch: int = 2, length: int = 9, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(hf: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, **kwargs):
    """Logits, every block's output (recorded by hooks) and ``output_hidden_states``."""
    outputs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(
        lambda _m, _a, out: outputs.append((out[0] if isinstance(out, tuple) else out).detach()))
        for b in blocks]
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, output_hidden_states=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out.logits, outputs, out.hidden_states


def max_relative_projection(states, u: torch.Tensor) -> float:
    """Largest |h . u| / |h| over all tokens of all given states."""
    return max(float((projection(h, u).abs() / h.norm(dim=-1).clamp_min(1e-6)).max())
               for h in states)


def enter(model: Model, d, coef=1.0) -> None:
    with ablate_direction(model, d, coef):
        pass


def hook_count(model: Model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def load_plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", FOLDABLE)
def test_orthogonalized_checkpoint_equals_runtime_ablation(name, tmp_path):
    model = build(name)
    d, ids = direction(), input_ids()
    embed_before = model.hf.get_input_embeddings().weight.detach().clone()
    head_before = model.hf.get_output_embeddings().weight.detach().clone()
    plain, _, _ = run(model.hf, model.blocks, ids)
    with ablate_direction(model, d):
        ablated, block_outs, hidden = run(model.hf, model.blocks, ids)
    scale = float(ablated.abs().max())
    assert float((ablated - plain).abs().max()) > 1e-2 * scale  # the ablation does something
    assert len(block_outs) == model.n_layers
    assert max_relative_projection(block_outs, d) < 1e-5
    # hidden_states[0] is the (ablated) block-0 input; the last entry is after the final norm
    assert max_relative_projection(hidden[1:-1], d) < 1e-5

    out = save_orthogonalized(model, d, tmp_path / "ortho", metadata={"note": name})
    assert torch.equal(run(model.hf, model.blocks, ids)[0], plain)  # copy=True: model untouched
    assert torch.equal(model.hf.get_input_embeddings().weight, embed_before)

    reloaded = load_plain(out)
    reloaded_model = Model.from_hf(reloaded, model.tokenizer)
    ortho, ortho_blocks, _ = run(reloaded, reloaded_model.blocks, ids)
    torch.testing.assert_close(ortho, ablated, rtol=0, atol=1e-4 * scale)
    assert max_relative_projection(ortho_blocks, d) < 1e-5
    # the unembedding is unchanged, and no longer shares the (edited) embedding
    assert torch.equal(reloaded.get_output_embeddings().weight, head_before)
    assert not torch.allclose(reloaded.get_input_embeddings().weight, embed_before)
    assert reloaded.get_output_embeddings().weight.data_ptr() != \
        reloaded.get_input_embeddings().weight.data_ptr()
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings") is not True
    info = json.loads((out / METADATA_FILE).read_text())
    assert info["direction_norm"] == pytest.approx(float(d.norm()))
    assert info["metadata"] == {"note": name}
    assert info["source"]["name"] == model.name
    assert (out / "tokenizer.json").is_file()


def test_tied_embeddings_untied_in_place():
    model = build("llama_tied")
    hf = model.hf
    assert hf.config.tie_word_embeddings
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    original = hf.lm_head.weight.detach().clone()
    d = direction()
    orthogonalize_weights(model, d)
    assert not hf.config.tie_word_embeddings
    assert torch.equal(hf.lm_head.weight, original)
    embedding = hf.get_input_embeddings().weight.detach()
    assert float((embedding @ (d / d.norm())).abs().max()) < 1e-5 * float(embedding.abs().max())
    hf.tie_weights()  # what from_pretrained does: must not re-tie
    assert torch.equal(hf.lm_head.weight, original)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_sandwich_norm_models_ablate_at_runtime_but_cannot_fold(name):
    model = build(name)
    names = [n for n, _ in residual_writers(model)]
    assert names[:2] == [f"{model.block_path}.0.post_attention_layernorm",
                         f"{model.block_path}.0.post_feedforward_layernorm"]
    d, ids = direction(), input_ids()
    plain, _, _ = run(model.hf, model.blocks, ids)
    with ablate_direction(model, d):
        ablated, block_outs, _ = run(model.hf, model.blocks, ids)
    assert max_relative_projection(block_outs, d) < 1e-5
    assert not torch.allclose(ablated, plain)
    state = {k: v.clone() for k, v in model.hf.state_dict().items()}
    with pytest.raises(SteeringError, match="ablate_direction"):
        orthogonalize_weights(model, d)
    assert all(torch.equal(v, state[k]) for k, v in model.hf.state_dict().items())


def test_writers_per_family():
    expected = {"llama": ("self_attn", "mlp"), "qwen2": ("self_attn", "mlp"),
                "mistral": ("self_attn", "mlp"), "phi3": ("self_attn", "mlp"),
                "gpt2": ("attn", "mlp"), "gpt_neox": ("attention", "mlp"),
                "gemma1": ("self_attn", "mlp"), "phi1": ("self_attn", "mlp")}
    for name, attrs in expected.items():
        model = build(name)
        names = [n for n, _ in residual_writers(model)]
        assert names == [f"{model.block_path}.{i}.{a}" for i in range(model.n_layers)
                         for a in attrs], name


def test_coef_zero_is_bit_identical_and_hooks_are_removed(tiny_llama):
    d, ids = direction(), input_ids()
    plain, _, _ = run(tiny_llama.hf, tiny_llama.blocks, ids)
    # counted after a first output_hidden_states call: transformers 5 then installs its own
    # (permanent) output-capturing hooks on blocks and attention modules
    before = hook_count(tiny_llama)
    with ablate_direction(tiny_llama, d, coef=0.0):
        zero, _, _ = run(tiny_llama.hf, tiny_llama.blocks, ids)
    with ablate_direction(tiny_llama, d, coef=torch.zeros(2)):
        assert hook_count(tiny_llama) > before
        zero_rows, _, _ = run(tiny_llama.hf, tiny_llama.blocks, ids)
    assert torch.equal(zero, plain)
    assert torch.equal(zero_rows, plain)
    assert hook_count(tiny_llama) == before
    with pytest.raises(RuntimeError, match="boom"), ablate_direction(tiny_llama, d):
        assert hook_count(tiny_llama) == before + 1 + 2 * tiny_llama.n_layers
        raise RuntimeError("boom")
    assert hook_count(tiny_llama) == before
    assert torch.equal(run(tiny_llama.hf, tiny_llama.blocks, ids)[0], plain)


def test_per_row_coefficients(tiny_llama):
    d, ids = direction(), input_ids()
    plain, _, _ = run(tiny_llama.hf, tiny_llama.blocks, ids)
    with ablate_direction(tiny_llama, d):
        ablated, _, _ = run(tiny_llama.hf, tiny_llama.blocks, ids)
    for coef in (torch.tensor([0.0, 1.0]), [0.0, 1.0]):
        with ablate_direction(tiny_llama, d, coef=coef):
            mixed, outs, _ = run(tiny_llama.hf, tiny_llama.blocks, ids)
        assert torch.equal(mixed[0], plain[0])
        torch.testing.assert_close(mixed[1], ablated[1], rtol=0, atol=1e-5)
        assert max_relative_projection([h[1] for h in outs], d) < 1e-5
    with ablate_direction(tiny_llama, d, coef=torch.ones(3)), \
            pytest.raises(SteeringError, match="3 per-row coefficients"):
        run(tiny_llama.hf, tiny_llama.blocks, ids)


def test_greedy_generation_matches_orthogonalized_model(tmp_path):
    model = build("llama")
    d = direction()
    tok = model.tokenizer
    tok.padding_side = "left"
    batch = tok(["Once upon a time", "hi"], return_tensors="pt", padding=True)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "use_cache": True,
              "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        plain = model.hf.generate(**batch, **kwargs)
        with ablate_direction(model, d):
            ablated = model.hf.generate(**batch, **kwargs)
            no_cache = model.hf.generate(**batch, **{**kwargs, "use_cache": False})
        folded = build("llama")  # same seed, same weights
        orthogonalize_weights(folded, d)
        ortho = folded.hf.generate(**batch, **kwargs)
        reloaded = load_plain(save_orthogonalized(model, d, tmp_path / "o")).generate(
            **batch, **kwargs)
    assert not torch.equal(plain, ablated)
    assert torch.equal(ablated, no_cache)
    assert torch.equal(ablated, ortho)
    assert torch.equal(ablated, reloaded)


def test_block_input_as_keyword_or_positional():
    model = build("gpt2")
    d = direction()
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(3)) * 5
    with torch.no_grad(), ablate_direction(model, d):
        by_keyword = model.blocks[0](hidden_states=x)
        by_position = model.blocks[0](x)
    by_keyword = by_keyword[0] if isinstance(by_keyword, tuple) else by_keyword
    by_position = by_position[0] if isinstance(by_position, tuple) else by_position
    assert torch.equal(by_keyword, by_position)
    assert max_relative_projection([by_keyword], d) < 1e-5


def test_clear_errors(tiny_llama):
    with pytest.raises(SteeringError, match="zero direction"):
        enter(tiny_llama, torch.zeros(32))
    with pytest.raises(SteeringError, match="32 wide"):
        enter(tiny_llama, torch.ones(33))
    with pytest.raises(SteeringError, match="32 wide"):
        enter(tiny_llama, torch.ones(2, 32))
    with pytest.raises(SteeringError, match="NaN"):
        enter(tiny_llama, torch.full((32,), float("nan")))
    with pytest.raises(SteeringError, match="finite"):
        enter(tiny_llama, torch.ones(32), coef=float("inf"))
    with pytest.raises(SteeringError, match="torch.Tensor"):
        enter(tiny_llama, [1.0] * 32)  # type: ignore[arg-type]
    model = build("llama")
    with pytest.raises(SteeringError, match="zero direction"):
        orthogonalize_weights(model, torch.zeros(32))
    with pytest.raises(SteeringError, match="32 wide"):
        orthogonalize_weights(model, torch.ones(16))


def test_unknown_blocks_are_refused():
    model = build("llama")
    odd = dataclasses.replace(model, blocks=nn.ModuleList([nn.Linear(32, 32)]), extra={})
    with pytest.raises(UnsupportedArchitectureError, match="op='ablate'"):
        residual_writers(odd)
    # names that look right but do not add up: the probe forward pass catches it
    block = model.blocks[1]
    original = block.forward
    block.forward = lambda *a, **k: original(*a, **k) * 2.0
    with pytest.raises(UnsupportedArchitectureError, match="input plus the outputs"):
        enter(model, direction())
