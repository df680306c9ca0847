"""Naturalness of discovered vectors (avec discover --naturalness) on tiny random models:
likelihood arithmetic against a direct forward pass, reachability arithmetic on known
embeddings, soft prompts against hard tokens, and the controls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avec.cli.main import main
from avec.discover.melbo import MelboConfig
from avec.discover.naturalness import (INSTRUCTIONS, InstructionPool, NaturalnessConfig, Reach,
                                       Steered, completions, halves, layer_permuted_copy,
                                       mean_logprob, paired_cosine, placeholder_id,
                                       random_init_copy, reach, score_naturalness, soft_ids,
                                       soft_objective, soft_prefix,
                                       token_logprobs, train_soft_prompts, with_instruction)
from avec.generation.hf import format_prompt, generate_ids
from avec.intervene.steer import steer
from avec.vector import SteeringVector

from conftest import make_tiny

PROMPTS = ["hello there", "a=1+2, b=3+4. What is a*b?", "x", "Tell me a story about a cat."]
TEXTS = ["I am fine, thanks.", "", "y z", "Once upon a time"]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama")


def direct_logprobs(model, prompt: str, text: str) -> list[float]:
    """One row, no padding, no batching: log-softmax of the logits, gathered at the text's
    tokens."""
    head = format_prompt(model, prompt)[0]
    tail = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logp = torch.log_softmax(model.hf(input_ids=ids).logits[0].float(), -1)
    return [float(logp[len(head) - 1 + t, tok]) for t, tok in enumerate(tail)]


def test_token_logprobs_equal_a_direct_forward_pass_whatever_the_batch(tiny) -> None:
    expected = [direct_logprobs(tiny, p, t) for p, t in zip(PROMPTS, TEXTS)]
    assert expected[1] == [] and len(expected[0]) == len("I am fine, thanks.")
    for batch_size in (1, 2, 4):  # 4: one right-padded batch of rows of different lengths
        got = token_logprobs(tiny, PROMPTS, TEXTS, batch_size=batch_size)
        assert [len(r) for r in got] == [len(r) for r in expected]
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, abs=1e-5)
    assert all(v < 0 for row in expected for v in row)


def test_mean_logprob_averages_tokens_then_completions(tiny) -> None:
    assert mean_logprob([[-1.0, -3.0], [], [-5.0]]) == pytest.approx(-3.5)  # (-2 + -5) / 2
    assert mean_logprob([[], []]) is None
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        token_logprobs(tiny, ["a", "b"], ["c"])


def test_logprobs_see_steering_and_coefficient_zero_is_exact(tiny) -> None:
    vec = SteeringVector({1: torch.randn(tiny.d_model, generator=torch.Generator()
                                         .manual_seed(0)) * 3})
    plain = token_logprobs(tiny, PROMPTS, TEXTS)
    with steer(tiny, vec, coef=0.0):
        assert token_logprobs(tiny, PROMPTS, TEXTS) == plain
    with steer(tiny, vec, coef=1.0):
        steered = token_logprobs(tiny, PROMPTS, TEXTS)
    assert steered[0] != pytest.approx(plain[0], abs=1e-3)


def test_paired_cosine_and_reach_arithmetic() -> None:
    e = np.eye(4)
    assert paired_cosine(np.array([[1.0, 0], [1, 1]]), np.array([[2.0, 0], [1, 0]])) == \
        pytest.approx([1.0, 2 ** -0.5])
    assert halves(5) == ([0, 2, 4], [1, 3])
    with pytest.raises(ValueError, match="at least 2 prompts"):
        halves(1)
    steered = np.stack([e[0], e[0], e[1], e[1]])  # 4 prompts: selection 0, 2; held-out 1, 3
    unsteered = np.stack([e[2]] * 4)  # orthogonal to every steered row
    resampled = np.stack([e[0], e[0] + e[2], e[1], e[1]])  # held-out: cos 1/sqrt2 and 1
    candidates = np.stack([
        unsteered,  # plain prompt: 0 everywhere
        np.stack([e[0], e[3], e[1], e[3]]),  # perfect on selection, 0 on held-out
        np.stack([e[0] + e[3], e[0], e[1] + e[3], e[1]]),  # 1/sqrt2 on selection, 1 held-out
    ])
    found = reach(steered, candidates, ["", "overfit", "general"], unsteered, resampled)
    assert found == Reach("overfit", 1.0, 0.0, 0.0, pytest.approx((2 ** -0.5 + 1) / 2))
    assert not found.natural
    found = reach(steered, candidates[[0, 2]], ["", "general"], unsteered, resampled)
    assert found.instruction == "general" and found.similarity == pytest.approx(1.0)
    assert found.selection == pytest.approx(2 ** -0.5) and found.natural
    tie = reach(steered, np.stack([steered, steered]), ["a", "b"], unsteered, resampled)
    assert tie.instruction == "a" and tie.to_dict()["natural"] is True
    with pytest.raises(ValueError, match="do not match"):
        reach(steered, candidates, ["", "overfit"], unsteered, resampled)


def test_soft_prefix_with_token_embeddings_equals_those_tokens(tiny) -> None:
    head = format_prompt(tiny, PROMPTS[1])[0]
    hard = [72, 105, 33]  # three byte tokens, inserted after the prompt's first token
    emb = tiny.hf.get_input_embeddings().weight[hard].detach()
    placed = soft_ids(tiny, head, 3)
    assert placed == head[:1] + [placeholder_id(tiny)] * 3 + head[1:]
    with torch.no_grad():
        want = tiny.hf(input_ids=torch.tensor([head[:1] + hard + head[1:]])).logits
        with soft_prefix(tiny, emb):
            got = tiny.hf(input_ids=torch.tensor([placed])).logits
        after = tiny.hf(input_ids=torch.tensor([placed])).logits
    assert torch.equal(got, want)
    assert not torch.allclose(after, want), "the hook is gone after the block"
    texts = completions(tiny, PROMPTS[:2], soft=emb, max_new_tokens=6)
    for prompt, text in zip(PROMPTS[:2], texts):
        ids = format_prompt(tiny, prompt)[0]
        ids = generate_ids(tiny, [ids[:1] + hard + ids[1:]], 6)[0]
        assert text == tiny.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_soft_objective_is_the_change_at_the_prompts_own_tokens(tiny) -> None:
    """sum over prompts of sum over tokens of |h_target(with tokens inserted) - h(plain)|^2
    (p=2, q=1), by direct forward passes; the first token cannot change."""
    cfg = MelboConfig(source_layer=0, target_layer=2)
    hard = [72, 105, 33]
    emb = tiny.hf.get_input_embeddings().weight[hard].detach()
    want = 0.0
    for prompt in PROMPTS:
        ids = format_prompt(tiny, prompt)[0]
        with torch.no_grad():
            plain = tiny.hf(input_ids=torch.tensor([ids]), output_hidden_states=True)
            ins = tiny.hf(input_ids=torch.tensor([ids[:1] + hard + ids[1:]]),
                          output_hidden_states=True)
        a, b = plain.hidden_states[3][0], ins.hidden_states[3][0]  # block 2's output
        b = torch.cat([b[:1], b[4:]])
        assert float((a[0] - b[0]).norm()) < 1e-4
        want += float((a - b).norm(dim=-1).pow(2).sum())
    assert soft_objective(tiny, PROMPTS, emb, cfg) == pytest.approx(want, rel=1e-4)


def test_padded_batches_give_the_unpadded_greedy_text(tiny) -> None:
    vec = SteeringVector({1: torch.ones(tiny.d_model)})
    for vector in (None, vec):
        exact = completions(tiny, PROMPTS, vector=vector, max_new_tokens=6)
        assert completions(tiny, PROMPTS, vector=vector, max_new_tokens=6, pad=True) == exact
    with pytest.raises(ValueError, match="soft"):
        completions(tiny, PROMPTS, soft=torch.zeros(2, tiny.d_model), pad=True)


def test_soft_prompts_climb_the_objective_on_their_sphere(tiny) -> None:
    cfg = MelboConfig(source_layer=0, target_layer=2, steps=12, patience=12, lr=0.05)
    from avec.discover.naturalness import SoftPromptConfig

    flags = [p.requires_grad for p in tiny.hf.parameters()]
    found = train_soft_prompts(tiny, PROMPTS, SoftPromptConfig(tokens=3, count=2, norm=2.0,
                                                               melbo=cfg))
    assert [p.requires_grad for p in tiny.hf.parameters()] == flags
    assert len(found) == 2 and not torch.equal(found[0].embeddings, found[1].embeddings)
    for soft in found:
        assert soft.embeddings.shape == (3, tiny.d_model)
        assert soft.embeddings.norm(dim=-1) == pytest.approx(torch.full((3,), 2.0), abs=1e-4)
        assert soft.objective == pytest.approx(max(soft.history), abs=1e-5)
        assert soft.objective > soft.history[0]
        assert soft_objective(tiny, PROMPTS, soft.embeddings, cfg) == \
            pytest.approx(soft.objective, rel=1e-4)


def test_controls_random_init_and_layer_permutation(tiny) -> None:
    before = {k: v.clone() for k, v in tiny.hf.state_dict().items()}
    permuted, perms = layer_permuted_copy(tiny, seed=3)
    assert all(torch.equal(v, before[k]) for k, v in tiny.hf.state_dict().items()), \
        "the original is untouched"
    names = [n for n, _ in tiny.blocks[0].named_parameters()]
    assert set(perms) == set(names)
    assert any(perms[n] != perms[names[0]] for n in names), "each tensor its own permutation"
    for name, perm in perms.items():
        assert sorted(perm) == list(range(tiny.n_layers))
        for layer in range(tiny.n_layers):
            got = dict(permuted.blocks[layer].named_parameters())[name]
            assert torch.equal(got, dict(tiny.blocks[perm[layer]].named_parameters())[name])
    assert torch.equal(permuted.hf.get_input_embeddings().weight,
                       tiny.hf.get_input_embeddings().weight)
    a, b = random_init_copy(tiny, seed=1), random_init_copy(tiny, seed=1)
    c = random_init_copy(tiny, seed=2)
    wa, wb, wc = (m.blocks[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not torch.equal(wa, tiny.blocks[0].mlp.up_proj.weight)
    assert a.n_layers == tiny.n_layers and a.d_model == tiny.d_model


class CharJudge:
    """An embedding judge stand-in: counts of each byte (deterministic, exact)."""

    def embed(self, texts):
        out = torch.zeros(len(texts), 256)
        for i, t in enumerate(texts):
            for ch in t.encode():
                out[i, ch] += 1
            out[i, 0] += 1e-3  # the empty text is not the zero vector
        return out


def test_score_naturalness_end_to_end(tiny) -> None:
    prompts = PROMPTS
    config = NaturalnessConfig(n_random=2, suggestions=1, instructions=("Be brief.", "Say hi."),
                               max_new_tokens=5, pad=False)
    vec = SteeringVector({1: torch.randn(tiny.d_model, generator=torch.Generator()
                                         .manual_seed(1)) * 4})
    pool = InstructionPool(tiny, prompts, config)
    plain = completions(tiny, prompts, max_new_tokens=5)
    steered_texts = completions(tiny, prompts, vector=vec, max_new_tokens=5)
    sampled = completions(tiny, prompts, vector=vec, temperature=0.7, max_new_tokens=5)
    sets = [Steered("vector 0", steered_texts, sampled),
            Steered("no change", plain, plain)]  # a "vector" that changes nothing
    judge = CharJudge()
    found = score_naturalness(tiny, prompts, sets, vec, config, pool=pool, judge=judge)
    assert found.instructions[:3] == ["", "Be brief.", "Say hi."]
    assert pool.texts[""] == plain and pool.texts["Say hi."] == completions(
        tiny, [with_instruction(p, "Say hi.") for p in prompts], max_new_tokens=5)
    assert found.unsteered_logprob == pytest.approx(mean_logprob(token_logprobs(
        tiny, prompts, plain)))
    assert found.rows[0]["logprob"] == pytest.approx(mean_logprob(token_logprobs(
        tiny, prompts, steered_texts)), abs=1e-4)
    pooled = [r for c in found.instructions[1:]
              for r in token_logprobs(tiny, prompts, pool.texts[c])]
    assert found.instructed_logprob == pytest.approx(mean_logprob(pooled))
    assert len(found.random_logprobs) == 2
    # the row's reach is the reach() of the judge's embeddings
    emb = lambda t: judge.embed(t).numpy()  # noqa: E731
    cand = np.stack([emb(pool.texts[c]) for c in found.instructions])
    want = reach(emb(steered_texts), cand, found.instructions, emb(plain), emb(sampled))
    row = found.rows[0]
    assert (row["instruction"], row["similarity"], row["ceiling"], row["natural"]) == (
        want.instruction, round(want.similarity, 4), round(want.ceiling, 4), want.natural)
    same = found.rows[1]  # the plain prompt reaches a vector that changes nothing
    assert same["similarity"] == pytest.approx(1.0) and same["natural"]
    assert same["logprob"] == pytest.approx(found.unsteered_logprob, abs=1e-4)
    doc = json.loads(json.dumps(found.to_json()))
    assert doc["completions"]["unsteered"] == plain and len(doc["rows"]) == 2
    with pytest.raises(ValueError, match="other prompts"):
        score_naturalness(tiny, prompts[:2], [Steered(s.name, s.greedy[:2], s.sampled[:2])
                                              for s in sets], vec, config, pool=pool,
                          judge=judge)
    assert len(INSTRUCTIONS) >= 64 and len(set(INSTRUCTIONS)) == len(INSTRUCTIONS)


def test_cli_naturalness_from_an_earlier_run(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("avec.evaluate.concepts.EmbeddingJudge", lambda: CharJudge())
    path = tmp_path / "tiny-llama"
    model = make_tiny("llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"{i}+{i}=" for i in range(4)))
    run = tmp_path / "run"
    base = ["discover", "--model", str(path), "--max-new-tokens", "4"]
    assert main([*base, "--prompts", str(prompts), "--num-vectors", "2", "--steps", "3",
                 "--source-layer", "1", "--target-layer", "2", "-o", str(run)]) == 0
    capsys.readouterr()
    instructions = tmp_path / "i.txt"
    instructions.write_text("Be brief.\n\nSay hi.\nBe brief.\n")
    out = tmp_path / "nat"
    assert main([*base, "--from", str(run), "--naturalness", "--naturalness-prompts", "3",
                 "--random-vectors", "2", "--suggestions", "0", "--instructions",
                 str(instructions), "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["naturalness"]
    assert [r["name"] for r in doc["rows"]] == ["vector 0", "vector 1"]
    saved = json.loads((out / "naturalness.json").read_text())
    assert saved["instructions"] == ["", "Be brief.", "Say hi."]
    assert len(saved["prompts"]) == 3 and saved["settings"]["n_random"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert saved["completions"]["vector 1"] == [t for t in summary["completions"][2][:3]]
    assert "Naturalness (3 prompts)" in (out / "report.html").read_text()
    for bad, message in ((["--no-summary"], "drop --no-summary"),
                         (["--naturalness-prompts", "1"], "at least 2")):
        assert main([*base, "--from", str(run), "--naturalness", *bad, "-o",
                     str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--from", str(run), "--naturalness", "--temperature", "0", "-o",
              str(tmp_path / "x")])
    assert "must be > 0" in capsys.readouterr().err
