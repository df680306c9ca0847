"""The method comparison on a tiny model: protocol, fairness and outputs."""

from __future__ import annotations

import json

import pytest
import torch

from avec.data import ContrastPair
from avec.evaluate.ab import ABItem
from avec.studies.compare import CompareSettings, Task, compare, write_outputs
from avec.studies.compare.measure import subset

PAIRS = [ContrastPair(f"I love thing {i}!", f"I hate thing {i}.") for i in range(10)]
ITEMS = [ABItem("Good?\n(A) yes\n(B) no", "A", "B"), ABItem("Bad?\n(A) yes\n(B) no", "B", "A")]


def test_compare_ab_protocol(tiny_llama, tmp_path):
    settings = CompareSettings(layer=1, n_pairs=(1, 4, 50), seeds=2, coefs=(1.0, 4.0),
                               kl_budget=0.5)
    res = compare(tiny_llama, PAIRS, Task(items=ITEMS, name="toy"), settings, ["hi", "yo"])
    methods = {(r["method"], r["n_pairs"]) for r in res.rows}
    assert ("actadd", 1) in methods and ("actadd", 4) not in methods  # single-pair method
    assert ("mean_diff", 50) not in methods  # more pairs than the pool: skipped
    assert len(res.rows) == 4 * 2 * 2 + 2
    for r in res.rows:
        assert r["kl"][0] == 0.0 and r["effects"][0] == res.baseline  # coef 0 is unsteered
        assert r["best_kl"] <= 0.5 and r["best_effect"] >= 0.0
        ok = [e - res.baseline for e, k in zip(r["effects"], r["kl"]) if k <= 0.5]
        assert abs(r["best_effect"] - max(ok)) < 1e-12
    same = [r["pairs"] for r in res.rows if r["n_pairs"] == 4 and r["seed"] == 1]
    assert all(p == same[0] for p in same)  # every method sees the same subset
    assert subset(10, 4, 1) == same[0] and subset(10, 4, 0) != same[0]
    summary = res.summary()
    md4 = next(s for s in summary if s["method"] == "mean_diff" and s["n_pairs"] == 4)
    assert md4["seeds"] == 2 and md4["effect_min"] <= md4["effect_mean"] <= md4["effect_max"]
    files = write_outputs(res, tmp_path)
    data = json.loads(open(files["json"]).read())
    assert data["summary"] == json.loads(json.dumps(summary)) and data["common_norm"] > 0
    page = open(files["html"]).read()
    assert "data:image/png;base64," in page and "mean_diff" in page and "<script" not in page
    assert "What the steering does" not in page  # A/B: no completions to show


def test_compare_directions_share_one_norm(tiny_llama, monkeypatch):
    import avec.studies.compare.run as cmp

    seen = []
    real = cmp.effects

    def spy(model, task, vectors, layer, coefs, settings, progress, judge):
        seen.extend(vectors)
        return real(model, task, vectors, layer, coefs, settings, progress, judge)

    monkeypatch.setattr(cmp, "effects", spy)
    settings = CompareSettings(layer=2, methods=("mean_diff", "pca", "probe", "random"),
                               n_pairs=(3,), seeds=1, coefs=(1.0,), norm=5.0)
    res = compare(tiny_llama, PAIRS, Task(prompts=["hi"], keywords=["love"]), settings, ["hi"])
    norms = [float(v[2].norm()) for v in seen]
    assert len(res.unsteered) == 1 and res.prompts == ["hi"]
    for r in res.rows:  # the completions at the chosen coefficient are kept
        assert len(r["best_completions"]) == 1
    assert len(norms) == 4 and all(abs(n - 5.0) < 1e-4 for n in norms)
    assert not torch.allclose(seen[0][2], seen[3][2])  # random differs from mean_diff


def test_results_round_trip(tiny_llama, tmp_path):
    from avec.studies.compare import load_result

    settings = CompareSettings(layer=1, methods=("mean_diff",), n_pairs=(2,), seeds=1,
                               coefs=(1.0,))
    res = compare(tiny_llama, PAIRS, Task(items=ITEMS), settings, ["hi"])
    files = write_outputs(res, tmp_path)
    again = load_result(files["json"])
    assert again.rows == json.loads(json.dumps(res.rows)) and again.summary() == res.summary()


def test_concept_report_shows_completions(tiny_llama, tmp_path):
    settings = CompareSettings(layer=1, methods=("mean_diff", "random"), n_pairs=(1, 3), seeds=1,
                               coefs=(2.0,), max_new_tokens=4)
    res = compare(tiny_llama, PAIRS, Task(prompts=["hi <b>", "yo"], keywords=["love"]), settings,
                  ["hi"])
    page = open(write_outputs(res, tmp_path)["html"]).read()
    assert "What the steering does" in page and "mean_diff, 3 pairs" in page
    assert "hi &lt;b&gt;" in page  # prompts and completions are escaped
    again = json.loads(open(tmp_path / "results.json").read())
    assert again["unsteered"] == res.unsteered and again["prompts"] == ["hi <b>", "yo"]


def test_sae_feature_rows_pick_the_separating_latent(tiny_llama, tmp_path):
    from avec.directions.activations import read_activations
    from avec.sae.feature import SAEFeature
    from avec.sae import SAEConfig, SparseAutoencoder, save_sae

    sae = SparseAutoencoder(SAEConfig(d_in=tiny_llama.d_model, d_sae=64, k=8, hook_layer=2))
    pos = read_activations(tiny_llama, [p.positive for p in PAIRS], [2], position="mean")[2]
    neg = read_activations(tiny_llama, [p.negative for p in PAIRS], [2], position="mean")[2]
    feature = SAEFeature(sae, by="difference")
    direction = feature.fit(pos, neg)
    diff = sae.encode(pos).mean(0) - sae.encode(neg).mean(0)
    assert feature.latent_ == int(diff.argmax())
    assert torch.equal(direction, sae.W_dec[feature.latent_].detach())
    path = save_sae(sae, tmp_path / "sae")
    settings = CompareSettings(layer=2, methods=("mean_diff", "sae"), n_pairs=(1, 3), seeds=1,
                               coefs=(1.0,), sae=str(path), sae_select="difference")
    res = compare(tiny_llama, PAIRS, Task(prompts=["hi"], keywords=["love"]), settings, ["hi"])
    sae_rows = [r for r in res.rows if r["method"] == "sae"]
    assert len(sae_rows) == 2 and all(0 <= r["latent"] < 64 for r in sae_rows)
    from avec.sae.evaluate import text_latents

    zp = text_latents(tiny_llama, sae, 2, [p.positive for p in PAIRS], "mean")
    zn = text_latents(tiny_llama, sae, 2, [p.negative for p in PAIRS], "mean")
    for r in sae_rows:  # per-token latents averaged per text, on the row's own pairs
        idx = r["pairs"]
        assert r["latent"] == int((zp[idx].mean(0) - zn[idx].mean(0)).argmax())
    assert res.task["sae"]["d_sae"] == 64
    wrong = CompareSettings(layer=1, methods=("sae",), n_pairs=(1,), seeds=1, sae=str(path))
    with pytest.raises(ValueError, match="pass --layer 2"):
        compare(tiny_llama, PAIRS, Task(prompts=["hi"], keywords=["love"]), wrong, ["hi"])


def test_sae_clamp_rows_clamp_inside_the_sae(tiny_llama, tmp_path):
    """With every latent off, clamping latent i to c x norm / |W_dec[i]| adds exactly the decoder
    row at the common norm times c: the clamp rows must then match the added rows."""
    from avec.sae import SAEConfig, SparseAutoencoder, save_sae
    from avec.sae.steer import steer_features
    from avec.evaluate.side_effects import kl_divergence, reference_logprobs

    sae = SparseAutoencoder(SAEConfig(d_in=tiny_llama.d_model, d_sae=16, activation="relu",
                                      hook_layer=1))
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # nothing ever fires
        sae.W_dec.mul_(3.0)  # rows of norm 3: the clamp value must undo it
    path = save_sae(sae, tmp_path / "sae")
    settings = CompareSettings(layer=1, methods=("sae", "sae_clamp"), n_pairs=(2,), seeds=1,
                               coefs=(2.0, 8.0), sae=str(path), max_new_tokens=6)
    task = Task(prompts=["hi", "the cat"], keywords=["love"])
    res = compare(tiny_llama, PAIRS, task, settings, ["hi", "yo"])
    add, clamp = res.rows
    assert (add["method"], clamp["method"]) == ("sae", "sae_clamp")
    assert add["latent"] == clamp["latent"] == 0 and add["pairs"] == clamp["pairs"]
    assert clamp["kl"][0] == 0.0 and clamp["kl"][2] > 0
    assert clamp["kl"] == pytest.approx(add["kl"], rel=1e-4, abs=1e-6)
    assert clamp["effects"] == pytest.approx(add["effects"])
    assert clamp["best_coef"] == add["best_coef"]
    assert clamp["best_completions"] == add["best_completions"]
    # the KL at coefficient 8 is the model's with the latent clamped to 8 x norm / 3
    reference = reference_logprobs(tiny_llama, ["hi", "yo"])  # unsteered
    with steer_features(tiny_llama, sae, 1, clamp={0: 8.0 * res.common_norm / 3.0}):
        by_hand = kl_divergence(tiny_llama, ["hi", "yo"], None, 1, [0.0],
                                reference=reference)[0]
    assert clamp["kl"][2] == pytest.approx(by_hand, rel=1e-5)
    assert res.task["sae"]["select"] == "selective"
    with pytest.raises(ValueError, match="sae_clamp"):
        compare(tiny_llama, PAIRS, task, CompareSettings(layer=1, methods=("sae_clamp",)),
                ["hi"])


def test_report_states_the_sae_cost():
    from avec.studies.compare.report import _sae_html

    assert _sae_html({}) == ""
    page = _sae_html({"sae": {"path": "/x/sae", "d_sae": 4096, "k": 32, "select": "selective",
                              "training_tokens": 92107,
                              "training_seconds": {"total": 418.6, "evaluate": 94.4}}})
    assert "92,107 tokens, 5.4 min to make" in page and "4096 latents (k=32)" in page
    assert "unknown data" in _sae_html({"sae": {"path": "p", "d_sae": 8, "k": None}})
