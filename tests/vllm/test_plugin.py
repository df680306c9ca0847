"""avec's vLLM plugin on the packaged default model (SmolLM2-135M-Instruct, float32, greedy).

Runs in the vLLM environment (`make test` calls `.venv-vllm/bin/python -m pytest tests/vllm`):
one eager engine for most tests, one compiled engine, and a tiny unsupported model for the
start-up check.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: an explicit KV budget

from avec.data.demo import DEMO_PAIRS  # noqa: E402
from avec.directions.extract import extract  # noqa: E402
from avec.intervene.steer import Intervention, steer  # noqa: E402
from avec.models import load_model  # noqa: E402
from avec.models.loading import model_directory  # noqa: E402
from avec.vector import SteeringVector  # noqa: E402
from avec.vllm import EXTRA_ARGS_KEY, VECTORS_ENV  # noqa: E402

PROMPTS = ["Tell me a story.", "What should I cook tonight?", "Describe your morning.",
           "Give me advice on my career.", "What is the capital of France?"]

# name -> steering entries; every setting the tests compare against HF and run concurrently
SETTINGS: dict[str, list[dict]] = {
    "plain": [],
    "add": [{"vector": "ocean", "coef": 8.0}],
    "add_neg": [{"vector": "ocean", "coef": -6.0}],
    "ablate": [{"vector": "ocean_all", "coef": 1.0, "op": "ablate"}],
    "clamp": [{"vector": "ocean", "coef": 1.0, "op": "clamp", "value": 40.0}],
    "prompt_only": [{"vector": "ocean", "coef": 12.0, "positions": "prompt"}],
    "generated_only": [{"vector": "ocean", "coef": 12.0, "positions": "generated"}],
    "stacked": [{"vector": "ocean", "coef": 6.0}, {"vector": "rand", "coef": 1.0},
                {"vector": "ocean", "coef": 1.0, "op": "clamp", "value": 20.0}],
}
MAX_TOKENS = 12
# a condition (CAST) fitted on these: steer only prompts about food
FOOD = ["What should I cook tonight?", "Give me a recipe for pancakes.", "How do I bake bread?",
        "What goes well with pasta?", "Suggest a healthy breakfast.",
        "How long should I boil an egg?"]
OTHER = ["Tell me a story.", "What is the capital of France?", "Give me advice on my career.",
         "How do planes fly?", "Describe your morning commute.", "Explain how tides work."]


@pytest.fixture(scope="module")
def hf():
    return load_model()


@pytest.fixture(scope="module")
def vectors(hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("vectors")
    all_layers = extract(hf, DEMO_PAIRS, layers=list(range(hf.n_layers)))
    all_layers.save(d / "ocean_all.safetensors")
    SteeringVector({10: all_layers[10]}, dict(all_layers.metadata)).save(d / "ocean.safetensors")
    g = torch.Generator().manual_seed(1)
    r = torch.randn(hf.d_model, generator=g)
    SteeringVector({10: r / r.norm() * 20.0, 20: -r / r.norm() * 20.0}).save(
        d / "rand.safetensors")
    return d


@pytest.fixture(scope="module")
def food(hf, vectors):
    """The fitted condition saved as ``food``; the HF decision for each of FOOD + OTHER."""
    from avec.intervene.condition_fit import fit, prompt_means

    result = fit(hf, FOOD, OTHER, [8], held_out=0.34, seed=0)
    result.vector(hf).save(vectors / "food.safetensors")
    met = result.leaf.met(prompt_means(hf, FOOD + OTHER, [8])).tolist()
    assert any(met) and not all(met)
    return met


def start(vectors, **kwargs):
    from vllm import LLM

    os.environ[VECTORS_ENV] = str(vectors)
    return LLM(model=model_directory(), dtype="float32", max_model_len=512, seed=0, **kwargs)


def stop(engine) -> None:
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def llm(vectors):
    engine = start(vectors, enforce_eager=True)
    yield engine
    stop(engine)


def prompt_ids(hf, text: str) -> list[int]:
    chat = hf.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)
    return list(hf.tokenizer(chat, add_special_tokens=False)["input_ids"])


def params(entries: list[dict], max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    extra = {EXTRA_ARGS_KEY: json.dumps(entries)} if entries else None
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          extra_args=extra)


def run(llm, ids: list[list[int]], entries: list[list[dict]], max_tokens: int = MAX_TOKENS
        ) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": x} for x in ids],
                        [params(e, max_tokens) for e in entries], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def hf_interventions(vectors, entries: list[dict]) -> list[Intervention]:
    from avec.vector import load_vector

    out = []
    for e in entries:
        out.append(Intervention(load_vector(vectors / f"{e['vector']}.safetensors"), e["coef"],
                                positions=e.get("positions", "all"), op=e.get("op", "add"),
                                value=e.get("value", 0.0)))
    return out


@torch.no_grad()
def hf_forced(hf, vectors, ids: list[int], tokens: list[int], entries: list[dict]) -> list[int]:
    """HF's greedy choice at each step of ``tokens`` (vLLM's continuation), fed one token at a
    time through the KV cache under avec's ``steer``: teacher-forced next-token predictions."""
    from contextlib import nullcontext

    ctx = steer(hf, hf_interventions(vectors, entries)) if entries else nullcontext()
    preds = []
    with ctx:
        out = hf.hf(input_ids=torch.tensor([ids]), use_cache=True)
        preds.append(int(out.logits[0, -1].argmax()))
        past = out.past_key_values
        for tok in tokens[:-1]:
            out = hf.hf(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            preds.append(int(out.logits[0, -1].argmax()))
    return preds


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_vllm_matches_avec_hf_steering(llm, hf, vectors, name):
    """The same vector at the same layers steers vLLM as avec's HF ``steer`` does: on vLLM's
    greedy continuation, HF's teacher-forced next token agrees at >= 99% of the steps."""
    ids = [prompt_ids(hf, p) for p in PROMPTS]
    ours = run(llm, ids, [SETTINGS[name]] * len(ids))
    ref = [hf_forced(hf, vectors, x, y, SETTINGS[name]) for x, y in zip(ids, ours)]
    assert agreement(ours, ref) >= 0.99, (name, ours, ref)
    if name != "plain":
        plain = run(llm, ids, [[]] * len(ids))
        assert ours != plain  # the setting really steers


def test_concurrent_requests_each_get_only_their_own_steering(llm, hf):
    """200 requests over the 8 settings in one continuous batch: each equals its setting run
    with only its own kind (the settings' texts all differ, so a leak would show)."""
    prompts = [prompt_ids(hf, f"{p} (variant {k})") for k in range(5) for p in PROMPTS]
    names = list(SETTINGS)
    jobs = [(prompts[i % len(prompts)], names[i % len(names)]) for i in range(200)]
    together = run(llm, [x for x, _ in jobs], [SETTINGS[n] for _, n in jobs])
    for name in names:
        mine = [i for i, (_, n) in enumerate(jobs) if n == name]
        alone = run(llm, [jobs[i][0] for i in mine], [SETTINGS[name]] * len(mine))
        assert [together[i] for i in mine] == alone, name


def test_a_request_joining_while_others_decode(llm, hf):
    """Requests added between engine steps (prefill mixed with running decodes) keep their own
    steering; the ones already running are unchanged by the newcomer."""
    engine = llm.llm_engine
    ids = [prompt_ids(hf, p) for p in PROMPTS[:4]]
    kinds = ["add", "plain", "ablate", "stacked"]
    expected = {f"r{i}": run(llm, [ids[i]], [SETTINGS[kinds[i]]])[0] for i in range(4)}
    done: dict[str, list[int]] = {}
    for i in range(2):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids[i]}, params(SETTINGS[kinds[i]]))
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        if steps == 4:  # the first two are decoding now
            for i in (2, 3):
                engine.add_request(f"r{i}", {"prompt_token_ids": ids[i]},
                                   params(SETTINGS[kinds[i]]))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    assert done == expected


def test_prefix_cache_never_crosses_steering(llm, hf):
    """A steered request's prompt KV is never reused for an unsteered one with the same
    prompt (or the reverse): the plugin salts the prefix cache with the steering."""
    ids = [prompt_ids(hf, "Explain how tides work, in detail, for a curious child. " * 12)]
    fresh = run(llm, ids, [[]])
    steered = run(llm, ids, [SETTINGS["add"]])
    assert run(llm, ids, [[]]) == fresh  # after a steered run of the same prompt
    assert run(llm, ids, [SETTINGS["add"]]) == steered  # a cache hit under the same steering
    assert steered != fresh


@pytest.mark.parametrize("entries, field", [
    ([{"vector": "nope", "coef": 1.0}], "avec_steering[0].vector"),
    ([{"vector": "ocean", "coef": "1"}], "avec_steering[0].coef"),
    ([{"vector": "ocean", "coef": 1.0, "layers": [3]}], "avec_steering[0].layers"),
    ([{"vector": "ocean", "coef": 1e9}], "avec_steering[0].coef"),
    ([{"vector": "ocean", "coef": 1.0, "op": "scale"}], "avec_steering[0].op"),
    ([{"vector": "ocean", "coef": 1.0, "extra": 1}], "avec_steering[0].extra"),
    ([{"vector": "ocean", "coef": 1.0}] * 9, "at most 8"),
])
def test_bad_entries_are_refused_naming_the_field(llm, hf, entries, field):
    from vllm.exceptions import VLLMValidationError

    ids = [prompt_ids(hf, PROMPTS[0])]
    with pytest.raises(VLLMValidationError, match=__import__("re").escape(field)):
        run(llm, ids, [entries])
    assert run(llm, ids, [[]]) == run(llm, ids, [[]])  # the engine keeps serving


def test_non_json_steering_is_refused(llm, hf):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    sp = SamplingParams(max_tokens=2, extra_args={EXTRA_ARGS_KEY: "[{"})
    with pytest.raises(VLLMValidationError, match="not valid JSON"):
        llm.generate([{"prompt_token_ids": prompt_ids(hf, "hi")}], sp, use_tqdm=False)


def test_self_check_passes_on_the_running_engine(llm, vectors, hf):
    from avec.vllm.check import run_check, write_probe

    write_probe(vectors, hf.d_model, 15)
    result = run_check(llm, 15)
    assert result.ok and result.steered_changed and result.plain_exact


def test_compiled_mode_steers_as_eager_does(llm, vectors, hf):
    """vLLM's default mode (torch.compile): forward hooks never fire there, the custom op
    does; the texts equal the eager engine's, for mixed batches."""
    ids = [prompt_ids(hf, p) for p in PROMPTS]
    kinds = ["add", "plain", "clamp", "generated_only", "stacked"]
    eager = run(llm, ids, [SETTINGS[k] for k in kinds])
    compiled = start(vectors)  # default compilation
    try:
        assert run(compiled, ids, [SETTINGS[k] for k in kinds]) == eager
    finally:
        stop(compiled)


def test_an_unsupported_architecture_refuses_to_start(tmp_path):
    """No silent no-op: on a model whose decoder layers the plugin does not patch (GPT-2), the
    worker's start-up check stops the engine with an error that says why."""
    import subprocess
    import sys

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(model_directory())
    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=256,
                        vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    code = ("from vllm import LLM\n"
            "if __name__ == '__main__':\n"
            f"    LLM(model={str(tmp_path / 'gpt2')!r}, enforce_eager=True, max_model_len=128)\n")
    script = tmp_path / "start.py"
    script.write_text(code)
    env = {**os.environ, VECTORS_ENV: ""}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode != 0
    assert "avec's steering op did not run at layer(s) [0, 1] of 2" in done.stdout + done.stderr


def test_preempted_requests_keep_their_steering(vectors, hf, food):
    """A KV cache of 5 blocks (128 tokens each) for 6 requests of 85 + 80 tokens: vLLM preempts
    running requests and recomputes them later (counted by its own metric); every request,
    steered on its generated tokens, conditionally, or plain, equals its run alone."""
    engine = start(vectors, enforce_eager=True, num_gpu_blocks_override=5,
                   disable_log_stats=False)
    try:
        topics = ["Tell me about the ocean and its creatures. ",
                  "Tell me how to cook a good tomato pasta sauce. "]
        ids = [prompt_ids(hf, topics[i // 3] * 8 + f"Part {i}.") for i in range(6)]
        kinds = [[], [{"vector": "rand", "coef": 1.0, "positions": "generated"}],
                 [{"vector": "rand", "coef": 1.0, "when": {"vector": "food"}}]]
        entries = [kinds[i % 3] for i in range(6)]
        outs = engine.generate([{"prompt_token_ids": x} for x in ids],
                               [params(e, max_tokens=80) for e in entries], use_tqdm=False)
        together = [list(o.outputs[0].token_ids) for o in outs]
        preemptions = sum(m.value for m in engine.get_metrics()
                          if m.name == "vllm:num_preemptions")
        assert preemptions > 0
        for x, e, got in zip(ids, entries, together):
            assert run(engine, [x], [e], max_tokens=80)[0] == got
    finally:
        stop(engine)


def test_the_server_default_steering_comes_first_and_can_be_switched_off(llm, hf, vectors):
    """``$AVEC_VLLM_DEFAULT`` (read when the front end is built; set here on the running
    engine's front end): every request gets it first, ``avec_default: false`` drops it."""
    from avec.vllm.requests import default_entries
    from avec.vllm.store import VectorStore

    ids = [prompt_ids(hf, PROMPTS[1])]
    plain, steered = run(llm, ids, [[]]), run(llm, ids, [SETTINGS["add"]])
    both = run(llm, ids, [SETTINGS["add"] + [{"vector": "rand", "coef": 1.0}]])
    front = llm.llm_engine.input_processor
    front._avec_default = default_entries(VectorStore(vectors), hf.n_layers,
                                          text=json.dumps(SETTINGS["add"]))
    try:
        assert run(llm, ids, [[]]) == steered
        assert run(llm, ids, [[{"vector": "rand", "coef": 1.0}]]) == both
        sp = params([])
        sp.extra_args = {"avec_default": "off"}
        out = llm.generate([{"prompt_token_ids": ids[0]}], sp, use_tqdm=False)
        assert list(out[0].outputs[0].token_ids) == plain[0]
    finally:
        front._avec_default = ()
    assert run(llm, ids, [[]]) == plain


def test_a_bad_default_steering_stops_the_engine_at_start(vectors, monkeypatch):
    monkeypatch.setenv("AVEC_VLLM_DEFAULT", json.dumps([{"vector": "ocean", "coef": 1.0,
                                                         "layers": [3]}]))
    with pytest.raises(Exception, match=r"default steering is invalid: \$AVEC_VLLM_DEFAULT\[0\]"
                                        r"\.layers: vector 'ocean' has no layer 3"):
        start(vectors, enforce_eager=True)


def test_the_start_up_check_refuses_an_engine_whose_op_was_removed(tmp_path):
    """Fault injection (``AVEC_VLLM_FAULT=skip-op``): the layers are built without the op, as a
    vLLM change that bypassed it would; the worker refuses to start instead of serving."""
    import subprocess
    import sys

    code = ("from vllm import LLM\n"
            "if __name__ == '__main__':\n"
            f"    LLM(model={model_directory()!r}, enforce_eager=True, max_model_len=128)\n")
    script = tmp_path / "start.py"
    script.write_text(code)
    env = {**os.environ, VECTORS_ENV: "", "AVEC_VLLM_FAULT": "skip-op"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode != 0
    assert "avec's steering op did not run at layer(s) [0, 1, 2, 3, 4, 5, 6, 7] of 30" in (
        done.stdout + done.stderr)


def test_conditional_steering_only_for_prompts_that_meet_the_condition(llm, hf, food):
    """CAST in one continuous batch: a conditional entry's requests equal generated-only
    steering where the prompt meets the condition (as HF decides it) and the plain model where
    it does not; plain and unconditionally steered batchmates are unchanged."""
    prompts = [prompt_ids(hf, p) for p in FOOD + OTHER]
    cond = [{"vector": "ocean", "coef": 12.0, "when": {"vector": "food"}}]
    negated = [{"vector": "ocean", "coef": 12.0, "when": {"not": {"vector": "food"}}}]
    jobs = ([(x, cond) for x in prompts] + [(x, negated) for x in prompts]
            + [(x, SETTINGS["add"]) for x in prompts[::3]] + [(x, []) for x in prompts[1::3]])
    together = run(llm, [x for x, _ in jobs], [e for _, e in jobs])
    steered = run(llm, prompts, [SETTINGS["generated_only"]] * len(prompts))
    plain = run(llm, prompts, [[]] * len(prompts))
    n = len(prompts)
    for i, met in enumerate(food):
        assert together[i] == (steered[i] if met else plain[i]), (i, met)
        assert together[n + i] == (plain[i] if met else steered[i]), (i, met)
    assert together[2 * n:] == run(llm, [x for x, _ in jobs[2 * n:]],
                                   [e for _, e in jobs[2 * n:]])
    assert any(s != p for s, p in zip(steered, plain))
