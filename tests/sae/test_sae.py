"""Sparse autoencoders: model, SAELens I/O, TopK training and steering with latents (tiny only)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from avec.models import Model
from avec.sae import (
    SAEConfig,
    SAEError,
    SAETrainConfig,
    SparseAutoencoder,
    feature_vector,
    load_sae,
    sae_metrics,
    save_sae,
    steer_features,
    train_sae,
)
from avec.intervene.steer import steer
from conftest import make_tiny

LAYER = 2


@pytest.fixture(scope="module")
def llama() -> Model:
    # a fresh model: the session's tiny_llama carries transformers' own output-capturing hooks
    # once any test asked for hidden states, and these tests count hooks
    return make_tiny("llama")


def tiny_sae(d_in: int = 32, d_sae: int = 64, k: int = 8, seed: int = 0,
             **cfg: Any) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, **cfg), seed=seed)
    with torch.no_grad():  # nonzero biases so every term of encode/decode is exercised
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
    return sae


def sparse_data(seed: int = 0, n: int = 2000, d: int = 16, m: int = 64,
                active: int = 3) -> torch.Tensor:
    """Rows that are positive combinations of ``active`` of ``m`` random unit directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(m, d, generator=g)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    idx = torch.stack([torch.randperm(m, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 2 + 0.5
    return (coef.unsqueeze(-1) * dirs[idx]).sum(1)


def block_outputs(model: Model, ids: torch.Tensor, layer: int = LAYER) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
    """(output of block ``layer``, logits) for one forward pass, read with a plain hook."""
    seen: list[torch.Tensor] = []
    handle = model.blocks[layer].register_forward_hook(
        lambda _m, _a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.no_grad():
            logits = model.hf(ids).logits
    finally:
        handle.remove()
    return seen[0], logits


def n_hooks(model: Model) -> int:
    return sum(len(block._forward_hooks) for block in model.blocks)


# ---- model -------------------------------------------------------------------------------
def test_shapes_and_backward() -> None:
    sae = tiny_sae()
    x = torch.randn(3, 5, 32, requires_grad=True)
    x_hat, z = sae(x)
    assert x_hat.shape == (3, 5, 32) and z.shape == (3, 5, 64)
    assert torch.allclose(x_hat, sae.decode(sae.encode(x)))
    x_hat.pow(2).sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert getattr(sae, name).grad is not None, name
    assert tuple(sae.W_enc.shape) == (32, 64) and tuple(sae.W_dec.shape) == (64, 32)
    with pytest.raises(SAEError, match="expects"):
        sae.encode(torch.randn(4, 31))


def test_init_is_tied_unit_norm_and_seeded() -> None:
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=40, k=4), seed=3)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(40), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_dec.any() and not sae.b_enc.any()
    again = SparseAutoencoder(SAEConfig(d_in=16, d_sae=40, k=4), seed=3)
    assert torch.equal(sae.W_dec, again.W_dec)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(40), atol=1e-6)


def test_init_b_dec_mean_and_median() -> None:
    sae = SparseAutoencoder(SAEConfig(d_in=2, d_sae=4, k=1))
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    sae.init_b_dec(points, "mean")
    assert torch.allclose(sae.b_dec, points.mean(0))
    sae.init_b_dec(points, "geometric_median")  # robust to the outlier
    assert float(sae.b_dec.detach().norm()) < 1.0


def test_topk_sparsity() -> None:
    sae = tiny_sae(k=5)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: exactly k survive
    z = sae.encode(torch.randn(7, 3, 32))
    assert ((z != 0).sum(-1) == 5).all()
    pre = sae.pre_activation(torch.randn(7, 32))
    kept = sae.activate(pre)
    top_vals = pre.topk(5, dim=-1).values
    assert torch.allclose(kept.sort(-1, descending=True).values[:, :5], top_vals)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)  # mostly negative: at most k, never a negative latent
    z = sae.encode(torch.randn(50, 32))
    assert ((z != 0).sum(-1) <= 5).all() and (z >= 0).all()
    with pytest.raises(SAEError, match="k <= d_sae"):
        SAEConfig(d_in=4, d_sae=8, k=9)


# ---- I/O ---------------------------------------------------------------------------------
def test_round_trip_is_exact(tmp_path) -> None:
    sae = tiny_sae(hook_layer=LAYER, model_name="tiny-llama", metadata={"note": "x"})
    path = save_sae(sae, tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_sae"] == 64 and cfg["activation_fn_str"] == "topk"
    assert cfg["activation_fn_kwargs"] == {"k": 8} and cfg["k"] == 8
    assert cfg["hook_name"] == f"blocks.{LAYER}.hook_resid_post" and cfg["hook_layer"] == LAYER
    loaded = load_sae(path)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert loaded.cfg == sae.cfg
    x = torch.randn(4, 6, 32)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x)[0], sae(x)[0])


def write_saelens(directory, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir()
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "sae_weights.safetensors"))


def random_tensors(d_in: int, d_sae: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g),
            "W_dec": torch.randn(d_sae, d_in, generator=g),
            "b_enc": torch.randn(d_sae, generator=g), "b_dec": torch.randn(d_in, generator=g)}


def test_load_saelens_relu_v5_layout(tmp_path) -> None:
    tensors = random_tensors(8, 20)
    write_saelens(tmp_path / "s", {"d_in": 8, "d_sae": 20, "activation_fn_str": "relu",
                                   "hook_name": "blocks.3.hook_resid_post", "model_name": "gpt2",
                                   "dtype": "float32", "apply_b_dec_to_input": True,
                                   "normalize_activations": "none", "device": "cpu"}, tensors)
    sae = load_sae(tmp_path / "s")
    assert sae.cfg.activation == "relu" and sae.cfg.hook_layer == 3 and sae.cfg.avec_layer == 3
    assert sae.cfg.model_name == "gpt2"
    x = torch.randn(5, 8)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    assert torch.allclose(sae.encode(x), torch.relu(pre))
    assert torch.allclose(sae(x)[0], torch.relu(pre) @ tensors["W_dec"] + tensors["b_dec"])


def test_load_saelens_topk_v6_layout(tmp_path) -> None:
    write_saelens(tmp_path / "s", {"architecture": "topk", "d_in": 8, "d_sae": 20, "k": 3,
                                   "apply_b_dec_to_input": False, "dtype": "float32",
                                   "meta": {"hook_name": "blocks.5.hook_resid_pre",
                                            "model_name": "m"}}, random_tensors(8, 20))
    sae = load_sae(tmp_path / "s")
    assert sae.cfg.activation == "topk" and sae.cfg.k == 3 and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.hook_layer == 5 and sae.cfg.avec_layer == 4  # resid_pre 5 = block 4 output
    assert ((sae.encode(torch.randn(10, 8)) != 0).sum(-1) <= 3).all()


def test_jumprelu_threshold_and_round_trip(tmp_path) -> None:
    tensors = {**random_tensors(8, 20), "threshold": torch.full((20,), 0.5)}
    write_saelens(tmp_path / "j", {"architecture": "jumprelu", "d_in": 8, "d_sae": 20,
                                   "hook_layer": 1}, tensors)
    sae = load_sae(tmp_path / "j")
    x = torch.randn(30, 8)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    assert torch.equal(sae.encode(x), torch.where(pre > 0.5, pre, torch.zeros_like(pre)))
    again = load_sae(save_sae(sae, tmp_path / "j2"))
    assert again.cfg == sae.cfg and torch.equal(again.threshold, sae.threshold)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(SAEError, match="not found"):
        load_sae(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match="cfg.json"):
        load_sae(tmp_path / "empty")
    tensors = random_tensors(8, 20)
    del tensors["b_enc"]
    write_saelens(tmp_path / "missing", {"d_in": 8, "d_sae": 20}, tensors)
    with pytest.raises(SAEError, match="b_enc"):
        load_sae(tmp_path / "missing")
    write_saelens(tmp_path / "shape", {"d_in": 8, "d_sae": 21}, random_tensors(8, 20))
    with pytest.raises(SAEError, match="W_enc has shape"):
        load_sae(tmp_path / "shape")
    write_saelens(tmp_path / "nok", {"d_in": 8, "d_sae": 20, "activation_fn_str": "topk"},
                  random_tensors(8, 20))
    with pytest.raises(SAEError, match="needs 'k'"):
        load_sae(tmp_path / "nok")
    write_saelens(tmp_path / "nodin", {"d_sae": 20}, random_tensors(8, 20))
    with pytest.raises(SAEError, match="d_in"):
        load_sae(tmp_path / "nodin")
    write_saelens(tmp_path / "gated", {"d_in": 8, "d_sae": 20, "architecture": "gated"},
                  random_tensors(8, 20))
    with pytest.raises(SAEError, match="unsupported"):
        load_sae(tmp_path / "gated")


# ---- training ----------------------------------------------------------------------------
def test_training_learns_and_is_deterministic() -> None:
    x = sparse_data()
    config = SAETrainConfig(d_sae=64, k=4, lr=1e-2, batch_size=64, epochs=15, seed=0,
                            dead_window=50, log_every=50)
    steps: list[int] = []
    sae, record = train_sae(x, config, progress=lambda step, total, loss: steps.append(step))
    metrics = record["metrics"]
    assert metrics["fve"] > 0.8, metrics
    assert metrics["l0"] <= 4.0 and isinstance(metrics["dead_latents"], int)
    assert record["steps"] == steps[-1] == 15 * 32 and len(record["epoch_losses"]) == 15
    assert record["history"] and all(isinstance(h["loss"], float) for h in record["history"])
    assert record["epoch_losses"][-1] < record["epoch_losses"][0]
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert sae_metrics(sae, x) == metrics
    again, record2 = train_sae(x, config)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(again, name)), name
    assert record2["history"] == record["history"]
    other, _ = train_sae(x, SAETrainConfig(**{**config.__dict__, "seed": 1, "epochs": 1}))
    assert not torch.equal(other.W_dec, sae.W_dec)


def test_training_steps_override_epochs() -> None:
    _, record = train_sae(sparse_data(n=300), SAETrainConfig(d_sae=32, k=2, batch_size=64,
                                                            steps=7, log_every=3))
    assert record["steps"] == 7 and [h["step"] for h in record["history"]] == [3, 6, 7]
    with pytest.raises(SAEError, match="k=40"):
        SAETrainConfig(d_sae=32, k=40)


# ---- steering ----------------------------------------------------------------------------
def test_clamp_to_current_value_is_identity(llama: Model) -> None:
    sae = tiny_sae()
    ids = torch.tensor([[5, 17, 99]])
    h, logits = block_outputs(llama, ids[:, :1])  # one token: one value per latent
    z = sae.encode(h).detach()[0, 0]
    latent = int(z.argmax())
    assert float(z[latent]) > 0
    inactive = int((z == 0).nonzero()[0])
    with steer_features(llama, sae, LAYER, clamp={latent: float(z[latent]), inactive: 0.0}):
        h2, logits2 = block_outputs(llama, ids[:, :1])
    assert torch.allclose(h2, h, atol=1e-6) and torch.allclose(logits2, logits, atol=1e-5)


def test_clamp_changes_output_and_hooks_are_removed(llama: Model) -> None:
    sae = tiny_sae()
    ids = torch.tensor([[5, 17, 99, 3], [8, 8, 1, 200]])
    h, logits = block_outputs(llama, ids)
    before = n_hooks(llama)
    latent, value = 7, 4.0
    with steer_features(llama, sae, LAYER, clamp={latent: value}):
        assert n_hooks(llama) == before + 1
        h2, logits2 = block_outputs(llama, ids)
    z = sae.encode(h)
    expected = h + (value - z[..., latent]).unsqueeze(-1) * sae.W_dec[latent].detach()
    assert torch.allclose(h2, expected, atol=1e-5)
    # the same through decode(z') - decode(z)
    z_clamped = z.clone()
    z_clamped[..., latent] = value
    assert torch.allclose(h2, h + sae.decode(z_clamped) - sae.decode(z), atol=1e-5)
    assert not torch.allclose(logits2, logits, atol=1e-3)
    assert n_hooks(llama) == before
    with pytest.raises(RuntimeError, match="boom"), \
            steer_features(llama, sae, LAYER, clamp={latent: value}):
        raise RuntimeError("boom")
    assert n_hooks(llama) == before
    assert torch.equal(block_outputs(llama, ids)[1], logits)


def test_add_equals_adding_decoder_row(llama: Model) -> None:
    sae = tiny_sae()
    ids = torch.tensor([[5, 17, 99, 3]])
    h, _ = block_outputs(llama, ids)
    with steer_features(llama, sae, LAYER, add={3: 2.5, 10: -1.0}):
        h2, _ = block_outputs(llama, ids)
    w = sae.W_dec.detach()
    assert torch.allclose(h2, h + 2.5 * w[3] - 1.0 * w[10], atol=1e-5)
    vector = feature_vector(sae, 3, LAYER)
    assert vector.layers == [LAYER] and vector.metadata["sae_latent"] == 3
    assert torch.equal(vector[LAYER], w[3])
    with steer(llama, vector, coef=2.5):
        h3, _ = block_outputs(llama, ids)
    assert torch.allclose(h3, h + 2.5 * w[3], atol=1e-5)


def test_steer_errors(llama: Model) -> None:
    before = n_hooks(llama)
    with pytest.raises(SAEError, match="d_model 32"), \
            steer_features(llama, tiny_sae(d_in=16), LAYER, add={0: 1.0}):
        pass
    with pytest.raises(SAEError, match="out of range"), \
            steer_features(llama, tiny_sae(), LAYER, clamp={64: 1.0}):
        pass
    with pytest.raises(SAEError, match="layer"), \
            steer_features(llama, tiny_sae(), 9, add={0: 1.0}):
        pass
    trained_on_1 = tiny_sae(hook_layer=1)
    with pytest.raises(SAEError, match="trained on layer 1"), \
            steer_features(llama, trained_on_1, LAYER, add={0: 1.0}):
        pass
    with steer_features(llama, trained_on_1, LAYER, add={0: 1.0}, check_site=False):
        pass
    assert n_hooks(llama) == before
