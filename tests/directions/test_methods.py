"""Direction-finding methods on synthetic data (no model) and ActAdd on a tiny model."""

from __future__ import annotations

import pytest
import torch

from avec.data import ContrastPair
from avec.directions.extract import extract, space_token_id
from avec.directions.methods import PCA, ActAdd, MeanDiff, Probe, RandomDirection, get_method
from avec.directions.methods.actadd import actadd_token_lists
from avec.intervene.steer import steer


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def synthetic(n=200, d=32, seed=0, noise=None):
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(d)
    direction[0] = 3.0
    base = torch.randn(n, d, generator=g) * 5  # large shared variation, cancels in differences
    spread = torch.randn(n, d, generator=g) * (noise if noise is not None else torch.ones(d))
    pos = base + direction / 2 + spread
    neg = base - direction / 2 + torch.randn(n, d, generator=g) * 0.1
    return pos, neg, direction


def test_pca_uncentered_finds_the_shared_direction():
    # differences = direction + noise with one high-variance nuisance axis
    noise = torch.ones(32) * 0.3
    noise[5] = 2.5
    pos, neg, direction = synthetic(noise=noise)
    uncentered = PCA().fit(pos, neg)
    centered = PCA(center=True).fit(pos, neg)
    assert cos(uncentered, direction) > 0.9
    assert abs(cos(centered, direction)) < 0.3  # the known bug: centring throws the mean away
    assert ((pos - neg) @ uncentered).mean() > 0  # positives project higher
    flipped = PCA().fit(neg, pos)
    assert cos(flipped, uncentered) < -0.999
    mean_proj = float(((pos - neg).double() @ (uncentered.double() / uncentered.double().norm())).mean())
    assert abs(float(uncentered.norm()) - mean_proj) < 1e-4


def test_probe_is_a_real_probe_not_mean_diff():
    """With anisotropic noise the probe down-weights the noisy axis; mean_diff does not."""
    g = torch.Generator().manual_seed(1)
    n, d = 400, 8
    mu = torch.zeros(d)
    mu[0], mu[1] = 1.0, 1.0
    noise_scale = torch.ones(d) * 0.5
    noise_scale[1] = 4.0  # the second informative axis is very noisy
    pos = mu / 2 + torch.randn(n, d, generator=g) * noise_scale
    neg = -mu / 2 + torch.randn(n, d, generator=g) * noise_scale
    md, probe = MeanDiff().fit(pos, neg), Probe().fit(pos, neg)
    assert cos(md, probe) < 0.95
    assert abs(float(probe[0])) > 3 * abs(float(probe[1]))  # noisy axis down-weighted

    def accuracy(w: torch.Tensor) -> float:
        s_pos, s_neg = pos @ w, neg @ w
        thr = (s_pos.mean() + s_neg.mean()) / 2
        return float(((s_pos > thr).float().mean() + (s_neg <= thr).float().mean()) / 2)

    assert accuracy(probe) > accuracy(md) + 0.03
    assert ((pos - neg) @ probe).mean() > 0
    again = Probe().fit(pos, neg)
    assert torch.equal(probe, again)  # deterministic


def test_random_control_has_mean_diff_norm_and_seed():
    pos, neg, _ = synthetic()
    r0, r0b, r1 = (RandomDirection(seed=s).fit(pos, neg) for s in (0, 0, 1))
    assert torch.equal(r0, r0b) and not torch.equal(r0, r1)
    assert abs(float(r0.norm()) - float(MeanDiff().fit(pos, neg).norm())) < 1e-4
    assert get_method("random", seed=3).seed == 3


def test_actadd_fit_and_padding():
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(ActAdd().fit(a, b), a - b)
    with pytest.raises(ValueError, match="one shape"):
        ActAdd().fit(a, b[:3])
    assert actadd_token_lists([1, 2, 3], [4], 9) == ([1, 2, 3], [4, 9, 9])


def test_extract_methods_on_tiny_model(tiny_llama):
    pairs = [ContrastPair(f"I love item {i}", f"I hate item {i}") for i in range(6)]
    vecs = {m: extract(tiny_llama, pairs, [1], method=m) for m in ("mean_diff", "pca", "probe",
                                                                  "random")}
    assert {v.metadata["method"] for v in vecs.values()} == {"mean_diff", "pca", "probe", "random"}
    assert all(v.shape == (tiny_llama.d_model,) for v in vecs.values())
    assert cos(vecs["pca"][1], vecs["mean_diff"][1]) > 0.5
    r1 = extract(tiny_llama, pairs, [1], method="random", seed=1)
    assert not torch.equal(r1[1], vecs["random"][1]) and r1.metadata["seed"] == 1


def test_actadd_injects_at_front_positions(tiny_llama):
    pair = ContrastPair("Love", "Hate it")
    vec = extract(tiny_llama, [pair], [1], method="actadd")
    width = len(tiny_llama.encode(["Hate it"])[0])
    assert vec.shape == (width, tiny_llama.d_model) and vec.metadata["n_pairs"] == 1
    assert tiny_llama.tokenizer.decode([space_token_id(tiny_llama)]) == " "
    ids = torch.tensor(tiny_llama.encode(["Once upon a time there was"]))
    with torch.no_grad():
        base = tiny_llama.hf(ids, output_hidden_states=True).hidden_states[2][0]
        with steer(tiny_llama, vec, coef=2.0):
            steered = tiny_llama.hf(ids, output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(steered[:width] - base[:width], 2.0 * vec[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(steered[width:], base[width:])  # later positions untouched at this block
    with pytest.raises(ValueError, match="exactly 1 pair"):
        extract(tiny_llama, [pair, pair], [1], method="actadd")
    with pytest.raises(Exception, match="can only be added"):
        with steer(tiny_llama, vec, op="ablate"):
            pass


def test_every_method_declares_how_it_is_fitted():
    """The method interface says what callers must do, so none branches on a name."""
    from avec.directions.methods import METHODS
    from avec.sae.feature import SAE_METHODS

    for name, cls in {**METHODS, **SAE_METHODS}.items():
        assert cls.reads in ("activations", "tokens", "latents"), name
        assert cls.applies in ("add", "clamp"), name
        assert cls.pairs_needed in (None, 1), name
        assert isinstance(cls.needs_sae, bool), name
    assert METHODS["actadd"].reads == "tokens" and METHODS["actadd"].pairs_needed == 1
    assert SAE_METHODS["sae_clamp"].applies == "clamp" and SAE_METHODS["sae"].applies == "add"


def test_make_method_takes_only_the_context_a_method_declares():
    from avec.directions.methods.base import make_method
    from avec.directions.methods import METHODS

    ctx = {"seed": 7, "sae": object(), "by": "difference"}
    assert make_method(METHODS, "random", context=ctx).info() == {"seed": 7}
    assert make_method(METHODS, "mean_diff", context=ctx).info() == {}
    with pytest.raises(ValueError, match="no setting 'center'"):
        make_method(METHODS, "mean_diff", center=True)
    with pytest.raises(ValueError, match="available"):
        make_method(METHODS, "nope")
    assert get_method("pca", center=True, context={"center": False}).center is True
