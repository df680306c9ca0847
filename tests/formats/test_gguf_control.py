"""llama.cpp / repeng control-vector GGUF files, and parity with the peers' recipes.

The peers themselves are not installed in the test environment (they pin old stacks; the
benchmark, bench/bench_peers.py, runs them in their own venvs). These tests re-state each
peer's recipe in a few lines, straight from its source, and check avec against it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avec import SteeringVector, extract, load_vector, steer
from avec.cli.main import main
from avec.data import ContrastPair
from avec.errors import VectorFileError
from avec.formats.gguf_control import write_gguf_control_vector
from avec.vector import read_gguf_control_vector
from avec.directions.methods import get_method


def repeng_export_gguf(path, model_type: str, directions: dict[int, np.ndarray]) -> None:
    """repeng 0.4's ``ControlVector.export_gguf``, line for line."""
    import gguf

    arch = "controlvector"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({2: torch.randn(32, generator=g), 5: torch.randn(32, generator=g)},
                         {"method": "mean_diff", "model": {"model_type": "llama"}})
    path = write_gguf_control_vector(vec, tmp_path / "v.gguf")
    back = load_vector(path)
    assert back.layers == [2, 5]
    for L in vec.layers:
        assert torch.equal(back[L], vec[L])
    assert back.metadata["model_hint"] == "llama"
    assert back.metadata["source_format"] == "gguf control vector"


def test_repeng_file_steers_like_repeng(tmp_path, tiny_llama):
    """repeng's ControlModule adds ``coeff * direction`` to the output of ``layers[L]``; the
    imported file, steered by avec at the same coefficient, gives the same logits."""
    model = tiny_llama
    d, layers = model.d_model, [1, 2]
    rng = np.random.default_rng(0)
    dirs = {L: rng.standard_normal(d).astype(np.float32) for L in layers}
    repeng_export_gguf(tmp_path / "r.gguf", "llama", dirs)
    vec = load_vector(tmp_path / "r.gguf", model)
    assert vec.layers == layers
    ids = torch.tensor([model.encode(["the quick brown fox"])[0]])
    coef = 0.7

    def repeng_hook(layer):
        def hook(_m, _a, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h + coef * torch.from_numpy(dirs[layer]).reshape(1, 1, -1)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook

    handles = [model.blocks[L].register_forward_hook(repeng_hook(L)) for L in layers]
    try:
        with torch.no_grad():
            expected = model.hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), steer(model, vec, coef=coef):
        got = model.hf(input_ids=ids).logits
    with torch.no_grad():
        plain = model.hf(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_gguf_refuses_bad_files(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")  # a model, not a control vector
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(VectorFileError, match="not a control vector"):
        read_gguf_control_vector(tmp_path / "model.gguf")
    repeng_export_gguf(tmp_path / "nan.gguf", "llama",
                       {3: np.array([1.0, np.nan, 0.0, 2.0], dtype=np.float32)})
    with pytest.raises(VectorFileError, match="NaN"):
        load_vector(tmp_path / "nan.gguf")
    repeng_export_gguf(tmp_path / "w.gguf", "llama", {3: np.ones(4, dtype=np.float32)})
    with pytest.raises(VectorFileError, match="width 4 does not match the model width 16"):
        read_gguf_control_vector(tmp_path / "w.gguf", expected_width=16)
    repeng_export_gguf(tmp_path / "2d.gguf", "llama", {3: np.ones((2, 4), dtype=np.float32)})
    with pytest.raises(VectorFileError, match="1-D direction"):
        load_vector(tmp_path / "2d.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(VectorFileError, match="not a readable GGUF"):
        load_vector(tmp_path / "junk.gguf")
    with pytest.raises(VectorFileError, match="not found"):
        load_vector(tmp_path / "missing.gguf")


def test_gguf_export_limits(tmp_path):
    with pytest.raises(VectorFileError, match="layer 0"):
        write_gguf_control_vector(SteeringVector({0: torch.ones(4), 1: torch.ones(4)}),
                                  tmp_path / "a.gguf")
    with pytest.raises(VectorFileError, match="ActAdd"):
        write_gguf_control_vector(SteeringVector({3: torch.ones(2, 4)}), tmp_path / "b.gguf")


def test_cli_convert_and_info(tmp_path, capsys):
    vec = SteeringVector({4: torch.arange(8.0), 6: -torch.arange(8.0)}, {"method": "pca"})
    vec.save(tmp_path / "v.safetensors")
    assert main(["convert", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "v.gguf"),
                 "--layers", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == [6]
    assert main(["info", str(tmp_path / "v.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == [6] and info["method"] == "imported"
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(tmp_path / "v.gguf"), "-o", str(back)]) == 0
    assert torch.equal(load_vector(back)[6], vec[6])
    assert main(["convert", str(tmp_path / "v.gguf"), "-o", str(tmp_path / "x.pt")]) == 2
    assert ".safetensors or .gguf" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "v.safetensors"), "--format", "gguf",
                 "-o", str(tmp_path / "e.gguf")]) == 0
    capsys.readouterr()
    assert torch.equal(load_vector(tmp_path / "e.gguf")[4], vec[4])
    zero = SteeringVector({0: torch.ones(8), 2: torch.ones(8)})
    zero.save(tmp_path / "z.safetensors")
    assert main(["export", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "z.gguf")]) == 2
    assert "layer 0" in capsys.readouterr().err


# ---- parity with the peers' recipes --------------------------------------------------------
def test_mean_diff_matches_steering_vectors_recipe(tiny_llama):
    """steering-vectors 0.12: batch of prompts (right-padded), decoder-block output at the last
    real token, ``mean(pos - neg)``. avec reads the same site: cosine 1."""
    model = tiny_llama
    pairs = [ContrastPair("I love this so much", "I hate this"),
             ContrastPair("what a wonderful day", "what an awful, awful day"),
             ContrastPair("kind words", "cruel words said loudly")]
    layers = [0, 2, 3]
    vec = extract(model, pairs, layers)
    tok = model.tokenizer

    def last_token_states(texts):
        ids = [model.encode([t])[0] for t in texts]
        width = max(map(len, ids))
        input_ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
        seen = {}

        def record(layer):  # steering-vectors' record_activations: a forward hook per block
            return lambda _m, _a, out: seen.__setitem__(
                layer, (out[0] if isinstance(out, tuple) else out).detach())

        handles = [model.blocks[L].register_forward_hook(record(L)) for L in layers]
        try:
            with torch.no_grad():
                model.hf(input_ids=input_ids, attention_mask=mask)
        finally:
            for h in handles:
                h.remove()
        last = mask.sum(1) - 1  # the read index -1, moved back over the right padding
        return {L: seen[L][torch.arange(len(texts)), last] for L in layers}

    pos = last_token_states([p.positive for p in pairs])
    neg = last_token_states([p.negative for p in pairs])
    for L in layers:
        sv = (pos[L] - neg[L]).mean(0)
        assert float(torch.nn.functional.cosine_similarity(sv, vec[L], dim=0)) > 0.99999
        torch.testing.assert_close(vec[L], sv, atol=1e-4, rtol=1e-4)


def _diffs(n=64, d=32, seed=0):
    """Pair differences = a shared behaviour direction m (norm 3) + variation between pairs
    mostly along one other axis (std 1.5) + small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(d)
    m[0] = 3.0
    noise = torch.zeros(n, d)
    noise[:, 1] = 1.5 * torch.randn(n, generator=g)
    noise += 0.3 * torch.randn(n, d, generator=g)
    neg = torch.randn(n, d, generator=g)
    return neg + m + noise, neg, m


def test_pca_matches_steering_vectors_pca_aggregator():
    """steering-vectors' ``pca_aggregator``: top left singular vector of ``[D; -D]^T``, sign
    by ``mean(D @ v)``. avec's uncentered PCA is the same direction (it also scales it)."""
    pos, neg, _m = _diffs()
    deltas = pos - neg
    u, _s, _v = torch.svd(torch.t(torch.cat([deltas, -deltas])))
    sv = u[:, 0] * torch.sign(torch.mean(deltas @ u[:, 0]))
    ours = get_method("pca").fit(pos, neg).float()
    assert float(torch.nn.functional.cosine_similarity(ours, sv, dim=0)) > 0.99999


def test_centred_pca_loses_the_mean_difference():
    """repeng 0.4 ``pca_diff`` fits sklearn's PCA, which centres the differences. When the pairs
    share one behaviour direction and vary between pairs along another axis, centring removes
    the shared part, and the centred component is that other axis; the uncentered PCA and the
    mean difference keep the behaviour direction."""
    pos, neg, m = _diffs()
    cos = lambda a: abs(float(torch.nn.functional.cosine_similarity(a.float(), m, dim=0)))  # noqa: E731
    centred = get_method("pca", center=True).fit(pos, neg)
    d = (pos - neg).double()
    sklearn_style = torch.linalg.svd(d - d.mean(0), full_matrices=False).Vh[0]
    assert abs(float(torch.nn.functional.cosine_similarity(centred, sklearn_style, dim=0))) > 0.9999
    assert cos(centred) < 0.1
    assert cos(get_method("pca").fit(pos, neg)) > 0.98
    assert cos(get_method("mean_diff").fit(pos, neg)) > 0.98
