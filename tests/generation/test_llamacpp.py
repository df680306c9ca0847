"""The llama.cpp backend on the real default model: control-vector indexing against the HF
backend, what it refuses, `avec generate --backend llama.cpp`, and the server on it."""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import openai
import pytest
import torch

import avec
from avec.generation.llamacpp import (ControlTerm, LlamaCppModel, check_terms, control_buffer,
                                    steered_completions)
from avec.generation.llamacpp_probe import probe
from avec.cli.main import main
from avec.data.demo import DEMO_PAIRS
from avec.errors import ModelLoadError, SteeringError
from avec.generation.hf import format_prompt, generate_ids
from avec.models.loading import default_model_path
from avec.vector import SteeringVector

from conftest import live_server

LAYER = 14
PROMPTS = ["Tell me about your day.", "What should I cook tonight?", "Describe a city.",
           "Give me advice on studying."]


@pytest.fixture(scope="module")
def lcpp() -> LlamaCppModel:
    """The packaged model on llama.cpp. Loading probes the build in a child process first: a
    llama.cpp that crashes on this CPU fails these tests with the rebuild command, and the
    rest of the suite runs on."""
    try:
        model = LlamaCppModel.load()
    except ModelLoadError as exc:
        pytest.fail(f"llama.cpp backend unusable: {exc}", pytrace=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def ocean(real_model) -> SteeringVector:
    return avec.extract(real_model, DEMO_PAIRS, [LAYER])


def moved(vec: SteeringVector, layer: int) -> SteeringVector:
    """The same direction filed under another layer (an off-by-one indexing bug)."""
    return SteeringVector({layer: vec[LAYER]}, dict(vec.metadata))


def test_the_installed_build_decodes():
    """The same check `make llama` runs: load the packaged GGUF and decode 8 tokens, in a
    child process so that a crash fails this test, not the session."""
    result = probe(default_model_path(), n_tokens=8)
    assert result.ok, result.message
    assert result.message == "ok 8 tokens"


def test_buffer_layout_and_refusals(ocean):
    d = ocean.width
    buf = control_buffer([ControlTerm(ocean, 2.0)], 30, d)
    assert buf.shape == (29 * d,) and buf.dtype == np.float32
    block = buf.reshape(29, d)  # row i is block i + 1
    np.testing.assert_allclose(block[LAYER - 1], 2.0 * ocean[LAYER].numpy(), rtol=1e-6)
    assert np.count_nonzero(np.delete(block, LAYER - 1, axis=0)) == 0
    for term, needle in [(ControlTerm(ocean, 1.0, op="ablate"), "cannot run on the llama.cpp"),
                         (ControlTerm(ocean, 1.0, op="clamp"), "use --backend hf"),
                         (ControlTerm(moved(ocean, 0), 1.0), "cannot steer layer 0"),
                         (ControlTerm(ocean, 1.0, layers=(3,)), "not in the vector"),
                         (ControlTerm(SteeringVector({LAYER: torch.ones(3, d)}), 1.0),
                          "per-position")]:
        with pytest.raises(SteeringError, match=needle):
            check_terms([term], 30, d)


def test_zero_control_vector_is_the_plain_model(lcpp):
    """The control vector is always installed (zeros when unsteered): logits must equal a
    fresh llama.cpp context that never had one."""
    import llama_cpp

    ids = format_prompt(lcpp, PROMPTS[0])[0]
    plain = llama_cpp.Llama(model_path=lcpp.source, n_ctx=512, n_threads=2, verbose=False)
    plain.eval(ids)
    ref = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(plain.ctx, -1),
                                shape=(lcpp._n_vocab,)).copy()
    plain.close()
    np.testing.assert_array_equal(lcpp.next_logits(ids), ref)


def test_same_vector_steers_both_backends_alike(lcpp, real_model, ocean):
    """The indexing proof. HF (float32 weights dequantized from the Q4_1 file) and llama.cpp
    (Q4_1 kernels) differ slightly even unsteered, so free-running greedy texts drift apart
    after some tokens; teacher forcing compares every step on the same prefix instead."""
    coef = 4.0
    agree: dict[str, list[float]] = {"right": [], "left": [], "up": [], "none": []}
    corr: dict[str, list[float]] = {"right": [], "left": [], "up": []}
    variants = {"right": [ControlTerm(ocean, coef)],
                "left": [ControlTerm(moved(ocean, LAYER - 1), coef)],
                "up": [ControlTerm(moved(ocean, LAYER + 1), coef)], "none": []}
    for prompt in PROMPTS:
        ids = format_prompt(real_model, prompt)[0]
        assert ids == format_prompt(lcpp, prompt)[0]  # same tokens and chat template
        with torch.inference_mode():
            base_hf = real_model.hf(torch.tensor([ids])).logits[0, -1].numpy()
            with avec.steer(real_model, ocean, coef=coef):
                steered_hf = real_model.hf(torch.tensor([ids])).logits[0, -1].numpy()
                hf_tokens = generate_ids(real_model, [ids], 24)[0]
        base_lc = lcpp.next_logits(ids)
        for name, terms in variants.items():
            forced = lcpp.logits_along(ids, hf_tokens, terms).argmax(-1)
            agree[name].append(float(np.mean(forced == np.array(hf_tokens))))
            if name != "none":
                shift = lcpp.next_logits(ids, terms) - base_lc
                corr[name].append(float(np.corrcoef(steered_hf - base_hf, shift)[0, 1]))
    mean = {k: float(np.mean(v)) for k, v in agree.items()}
    assert mean["right"] >= 0.85, mean
    assert min(agree["right"]) >= 0.75, agree
    assert mean["right"] - max(mean["left"], mean["up"], mean["none"]) >= 0.2, mean
    assert min(corr["right"]) >= 0.99, corr
    assert max(corr["left"] + corr["up"]) <= 0.95, corr


def test_positions_switch_the_control_vector(lcpp, ocean):
    ids = format_prompt(lcpp, PROMPTS[1])[0]
    plain = lcpp.next_logits(ids)
    everywhere = lcpp.next_logits(ids, [ControlTerm(ocean, 6.0)])
    # the last prompt token's prediction: steered under "prompt", untouched under "generated"
    np.testing.assert_array_equal(lcpp.next_logits(ids, [ControlTerm(ocean, 6.0, None,
                                                                       "prompt")]), everywhere)
    np.testing.assert_array_equal(lcpp.next_logits(ids, [ControlTerm(ocean, 6.0, None,
                                                                       "generated")]), plain)
    assert not np.array_equal(plain, everywhere)
    gen = lcpp.generate(ids, 12, [ControlTerm(ocean, 8.0, None, "generated")])
    free = lcpp.generate(ids, 12)
    assert gen[0] == free[0] and gen != free  # first token from the unsteered prompt pass


def test_non_finite_outputs_raise_instead_of_garbage(lcpp, ocean):
    ids = format_prompt(lcpp, PROMPTS[1])[0]
    huge = SteeringVector({LAYER: ocean.directions[LAYER] * 1e30})
    with pytest.raises(SteeringError, match="NaN or infinite"):
        lcpp.generate(ids, 4, [ControlTerm(huge, 1e9)])
    assert lcpp.generate(ids, 4) == lcpp.generate(ids, 4)  # the model is unharmed


def test_sampling_is_seeded(lcpp):
    from avec.generation.hf import RowSampling

    ids = format_prompt(lcpp, PROMPTS[2])[0]

    def draw(seed: int) -> list[int]:
        return lcpp.generate(ids, 16, sampling=RowSampling(1.0, torch.Generator().manual_seed(seed)))

    assert draw(1) == draw(1) and draw(1) != draw(2)


def test_generate_cli_on_llama_cpp(capsys, tmp_path, lcpp, ocean):
    path = ocean.save(tmp_path / "ocean.safetensors")
    code = main(["generate", "--backend", "llama.cpp", "--vector", str(path), "--coef", "8",
                 "--prompt", PROMPTS[0], "--max-new-tokens", "16", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    ref = steered_completions(lcpp, [PROMPTS[0]], ocean, [8.0], max_new_tokens=16)
    assert [r["text"] for r in rows] == [ref[0].text]
    assert main(["generate", "--backend", "llama.cpp", "--vector", str(path), "--op", "ablate",
                 "--coef", "1", "--prompt", "hi"]) == 2
    assert "cannot run on the llama.cpp backend" in capsys.readouterr().err


def test_server_on_llama_cpp(lcpp, ocean):
    from avec.serve import LlamaCppEngine, VectorRegistry, create_app

    registry = VectorRegistry(lcpp)
    registry.put("ocean", ocean)
    registry.put("ocean_up", moved(ocean, LAYER + 1))
    engine = LlamaCppEngine(lcpp, registry)
    app = create_app(engine, model_id=lcpp.name)
    settings = [None, [{"vector": "ocean", "coef": 6.0}],
                [{"vector": "ocean_up", "coef": -4.0}],
                [{"vector": "ocean", "coef": 3.0}, {"vector": "ocean_up", "coef": 3.0}]]
    try:
        with live_server(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

            def ask(steering):
                extra = {"steering": steering} if steering else None
                r = client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": PROMPTS[3]}],
                    max_tokens=12, extra_body=extra)
                return r.choices[0].message.content

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                got = list(pool.map(ask, settings * 2))
            ids = format_prompt(lcpp, PROMPTS[3])[0]
            for steering, text in zip(settings * 2, got):
                terms = [ControlTerm(registry.get(s["vector"]), s["coef"])
                         for s in steering or []]
                ref = lcpp.tokenizer.decode(engine.model.generate(ids, 12, terms),
                                            skip_special_tokens=True)
                assert text == ref
            assert len(set(got[:4])) == 4  # the four settings really differ
            with pytest.raises(openai.BadRequestError, match="use --backend hf"):
                ask([{"vector": "ocean", "coef": 1.0, "op": "ablate"}])
            assert ask(None) == got[0]  # still serving after the bad request
    finally:
        engine.shutdown()


def test_block_outputs_read_from_llama_cpp_match_hf(lcpp, real_model, ocean):
    """A condition's input on llama.cpp (block outputs copied by an eval callback in a second
    context) is HF's, up to the Q4_1 kernels' rounding; the condition layer's own control row
    is not part of it (HF reads a layer before steering it), earlier layers' rows are."""
    from avec.intervene.condition_fit import prompt_means

    hf = prompt_means(real_model, PROMPTS, [8, LAYER])
    for i, prompt in enumerate(PROMPTS):
        ids = format_prompt(lcpp, prompt)[0]
        got = lcpp.prompt_means(ids, [8, LAYER])
        for L in (8, LAYER):
            cos = float(torch.nn.functional.cosine_similarity(
                torch.from_numpy(got[L]), hf[L][i], dim=0))
            assert cos > 0.99, (prompt, L, cos)
        own = lcpp.prompt_means(ids, [LAYER], [ControlTerm(ocean, 6.0)])[LAYER]
        np.testing.assert_allclose(own, got[LAYER], atol=1e-3)
        earlier = lcpp.prompt_means(ids, [LAYER], [ControlTerm(moved(ocean, LAYER - 1), 6.0)])
        assert np.abs(earlier[LAYER] - got[LAYER]).max() > 0.1
    with pytest.raises(SteeringError, match="last block"):
        lcpp.prompt_means(format_prompt(lcpp, PROMPTS[0])[0], [lcpp.n_layers - 1])


def test_conditional_terms_on_llama_cpp(lcpp, ocean):
    """A conditional term (CAST) on llama.cpp: a prompt above the threshold is steered on its
    generated tokens exactly as a generated-only term steers it; one below is the plain model;
    in the server, concurrent conditional requests each get their own decision."""
    from avec.intervene.conditions import Leaf, Not, condition_vector
    from avec.serve import LlamaCppEngine, VectorRegistry, create_app

    ids = [format_prompt(lcpp, p)[0] for p in PROMPTS]
    g = torch.Generator().manual_seed(3)
    direction = torch.randn(lcpp.d_model, generator=g)
    values = [float(torch.nn.functional.cosine_similarity(
        torch.from_numpy(lcpp.prompt_means(x, [8])[8]), direction, dim=0)) for x in ids]
    threshold = float(np.median(values))
    assert min(abs(v - threshold) for v in values) > 1e-4
    cond = Leaf(direction, 8, threshold, ">")
    for x, v in zip(ids, values):
        plain = lcpp.generate(x, 10)
        steered = lcpp.generate(x, 10, [ControlTerm(ocean, 8.0, None, "generated")])
        assert steered != plain
        got = lcpp.generate(x, 10, [ControlTerm(ocean, 8.0, None, "generated", when=cond)])
        negated = lcpp.generate(x, 10, [ControlTerm(ocean, 8.0, None, "generated",
                                                    when=Not(cond))])
        assert got == (steered if v > threshold else plain)
        assert negated == (plain if v > threshold else steered)
    with pytest.raises(SteeringError, match="generated tokens"):
        check_terms([ControlTerm(ocean, 1.0, when=cond)], lcpp.n_layers, lcpp.d_model)

    registry = VectorRegistry(lcpp)
    registry.put("ocean", ocean)
    registry.put("cond", condition_vector(direction, 8, threshold))
    engine = LlamaCppEngine(lcpp, registry)
    app = create_app(engine, model_id=lcpp.name)
    try:
        with live_server(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            entry = [{"vector": "ocean", "coef": 8.0, "when": {"vector": "cond"}}]

            def ask(prompt, steering=entry):
                r = client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": prompt}],
                    max_tokens=10, extra_body={"steering": steering})
                return r.choices[0].message.content

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                got = list(pool.map(ask, PROMPTS))
            for x, v, text in zip(ids, values, got):
                terms = [ControlTerm(ocean, 8.0, None, "generated")] if v > threshold else []
                assert text == lcpp.tokenizer.decode(lcpp.generate(x, 10, terms),
                                                     skip_special_tokens=True)
            with pytest.raises(openai.BadRequestError, match="per_token"):
                ask(PROMPTS[0], [{**entry[0], "per_token": True}])
    finally:
        engine.shutdown()
