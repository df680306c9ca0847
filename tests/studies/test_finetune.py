"""Supervised fine-tuning: label masking, learning, determinism, saving and loading."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import byte_tokenizer, make_tiny, tiny_config

from avec.errors import DataError
from avec.studies.refusal.finetune import (IGNORE_INDEX, METADATA_FILE, Example, FinetuneConfig, FinetuneError,
                           collate, encode_example, finetune, load_examples, save_examples,
                           save_finetuned, turn_format)
from avec.generation.hf import format_prompt, generate_ids
from avec.models import Model, load_model

MEMO = [Example("color one", "red apple"), Example("color two", "blue sky"),
        Example("color three", "green leaf"), Example("color four", "gold sun")]
FAST = dict(epochs=40, batch_size=4, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def sharp_llama() -> Model:
    """The tiny llama with a larger final-norm gain: LoRA leaves the norm and the output head
    frozen, and with the tiny model's small random head the logits could not get sharp enough
    for the loss to fall far (real models have no such limit)."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.hf.model.norm.weight.mul_(4.0)
    return model


def state(model: Model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def greedy(model: Model, instruction: str, n: int = 12) -> str:
    ids = generate_ids(model, [format_prompt(model, instruction)[0]], n)[0]
    return model.tokenizer.decode(ids)


def templated_ids(model: Model, instruction: str, response: str) -> list[int]:
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}],
        tokenize=False)
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def check_encoding(model: Model, instruction: str, response: str) -> None:
    """Prompt ids = generation's prompt ids; prompt + target = the templated conversation;
    labels only on the target; an incomplete example stops at the response."""
    tok = model.tokenizer
    prompt = format_prompt(model, instruction)[0]
    enc = encode_example(model, Example(instruction, response))
    assert enc.input_ids == templated_ids(model, instruction, response)
    assert enc.input_ids[:len(prompt)] == prompt
    assert enc.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert enc.labels[len(prompt):] == enc.input_ids[len(prompt):]
    end = turn_format(model).end
    assert end and tok.decode(enc.labels[len(prompt):]) == response + end
    cut = encode_example(model, Example(instruction, response, complete=False))
    assert cut.input_ids[:len(prompt)] == prompt
    assert tok.decode([t for t in cut.labels if t != IGNORE_INDEX]) == response


def test_label_masking_and_padding(tiny_llama):
    check_encoding(tiny_llama, "color one", "red apple")
    assert turn_format(tiny_llama).end == "\n"
    encoded = [encode_example(tiny_llama, ex) for ex in MEMO[:2]]
    batch = collate(encoded, pad_id=tiny_llama.tokenizer.pad_token_id)
    long, short = (0, 1) if len(encoded[0].input_ids) > len(encoded[1].input_ids) else (1, 0)
    n = len(encoded[short].input_ids)
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1]
                                                                       - n)
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, n:] == tiny_llama.tokenizer.pad_token_id).all()
    assert batch["labels"][long].tolist() == encoded[long].labels


def test_loss_is_mean_over_response_tokens(tiny_llama):
    """The first step's loss (computed from the response positions' logits only) equals the
    mean cross-entropy over every labelled token of the batch, from full logits."""
    from avec.studies.refusal.finetune import response_loss

    batch = collate([encode_example(tiny_llama, ex) for ex in MEMO], 257)
    with torch.no_grad():
        logits = tiny_llama.hf(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    want = -log_probs[keep].gather(-1, target[keep][:, None]).mean()
    assert response_loss(logits, batch["labels"])[0].item() == pytest.approx(want.item(), 1e-5)
    result = finetune(tiny_llama, MEMO, FinetuneConfig(epochs=1, batch_size=4), progress=False)
    assert result.losses[0] == pytest.approx(want.item(), rel=1e-5)


def test_no_chat_template_ends_with_eos():
    model = make_tiny("llama", chat=False)
    enc = encode_example(model, Example("Q: 2+2? A:", " 4"))
    prompt = model.encode(["Q: 2+2? A:"])[0]
    assert enc.input_ids[:len(prompt)] == prompt
    assert enc.labels[len(prompt):] == enc.input_ids[len(prompt):]
    assert enc.input_ids[-1] == model.tokenizer.eos_token_id
    cut = encode_example(model, Example("Q: 2+2? A:", " 4", complete=False))
    assert cut.input_ids[-1] != model.tokenizer.eos_token_id


def test_truncation_warns_and_skips(tiny_llama):
    examples = [Example("short", "ok"), Example("x" * 40, "long answer " * 10)]
    enc = encode_example(tiny_llama, examples[1], max_length=30)
    assert enc.truncated and len(enc.input_ids) == 30 and enc.n_target == 0
    with pytest.warns(UserWarning, match="1 of 2 examples .* truncated; 1 had no response"):
        result = finetune(tiny_llama, examples, FinetuneConfig(epochs=1, max_length=30),
                          progress=False)
    assert result.n_examples == 1 and result.n_truncated == 1
    with pytest.raises(DataError, match="no example has a response token"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finetune(tiny_llama, examples[1:], FinetuneConfig(max_length=30), progress=False)


@pytest.mark.parametrize("rank,lr", [(8, 1e-2), (0, 3e-3)])
def test_memorises_examples(sharp_llama, rank, lr):
    tiny_llama = sharp_llama
    before = state(tiny_llama)
    result = finetune(tiny_llama, MEMO, FinetuneConfig(lora_rank=rank, learning_rate=lr, **FAST),
                      progress=False)
    assert len(result.losses) == 40 and result.n_examples == 4
    assert 0 < result.seconds < 300
    assert result.losses[-1] < 0.3 * result.losses[0], result.losses
    assert result.n_tokens_trained == 40 * sum(encode_example(tiny_llama, e).n_target
                                               for e in MEMO)
    trained = result.model
    assert not trained.hf.training and trained.tokenizer is tiny_llama.tokenizer
    assert type(trained.hf) is type(tiny_llama.hf)  # LoRA merged back: a plain HF model
    assert not any("lora" in k for k in trained.hf.state_dict())
    for ex in MEMO:
        assert greedy(trained, ex.instruction).startswith(ex.response + "\n"), ex
    after = state(tiny_llama)  # the input model is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in trained.hf.parameters())


def test_deterministic_given_seed(tiny_llama):
    def run(seed: int, rank: int):
        cfg = FinetuneConfig(epochs=2, batch_size=2, lora_rank=rank, seed=seed,
                             learning_rate=1e-2)
        return finetune(tiny_llama, MEMO, cfg, progress=False)

    for rank in (4, 0):
        a, b, c = run(0, rank), run(0, rank), run(1, rank)
        assert a.losses == b.losses
        sa, sb, sc = state(a.model), state(b.model), state(c.model)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.losses != c.losses
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_target_modules_and_inplace():
    model = make_tiny("llama")
    before = state(model)
    cfg = FinetuneConfig(epochs=1, batch_size=4, lora_rank=4, learning_rate=1e-2,
                         target_modules=["q_proj", "v_proj"])
    result = finetune(model, MEMO, cfg, progress=False, inplace=True)
    assert result.model.hf is model.hf and result.model.blocks is model.blocks
    after = state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert set(after) == set(before)
    with pytest.raises(FinetuneError, match="target_modules"):
        finetune(model, MEMO, FinetuneConfig(target_modules=["nope"]), progress=False)


def test_save_reload_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    hf = AutoModelForCausalLM.from_config(cfg)
    base = Model.from_hf(hf, byte_tokenizer(), name="tiny-tied")
    result = finetune(base, MEMO, FinetuneConfig(epochs=2, batch_size=2, learning_rate=1e-2),
                      progress=False)
    hf = result.model.hf
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    hf.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF-loaded model has
    out = save_finetuned(result, tmp_path / "ft", metadata={"data": "memo"})
    assert (out / "model.safetensors").is_file()
    info = json.loads((out / METADATA_FILE).read_text())
    assert info["n_examples"] == 4 and info["metadata"] == {"data": "memo"}
    assert info["config"]["lora_rank"] == 16 and info["config"]["learning_rate"] == 1e-2
    assert info["loss"]["steps"] == len(result.losses) == 4 and info["avec_version"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    ids = torch.tensor([encode_example(base, MEMO[0]).input_ids])
    with torch.no_grad():
        want = hf(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
        assert torch.equal(plain(ids).logits, want)
        again = load_model(out)
        assert torch.equal(again.hf(ids).logits, want)
    assert again.tokenizer.chat_template == base.tokenizer.chat_template


def test_examples_round_trip_and_errors(tmp_path):
    examples = [Example("a", "b"), Example("c", "d, cut", complete=False)]
    path = save_examples(examples, tmp_path / "ex.jsonl")
    assert load_examples(path) == examples
    alias = tmp_path / "alias.jsonl"
    alias.write_text('{"prompt": "p", "response": "r"}\n\n{"instruction": "i", "response": ""}\n')
    assert load_examples(alias) == [Example("p", "r"), Example("i", "")]
    bad = {
        '{"instruction": "a", "response": "b"}\n{"instruction": "a"': ":2: invalid JSON",
        '{"instruction": "a"}': ":1: missing key 'response'",
        '{"response": "b"}': ":1: missing key 'instruction'",
        '{"instruction": "a", "response": 3}': ":1: 'response' must be a string",
        '{"instruction": "a", "response": "b", "complete": "no"}': ":1: 'complete' must be",
        '["a", "b"]': ":1: expected a JSON object",
        '{"instruction": " ", "response": "b"}': ":1: instruction must be a non-empty",
        '{"instruction": "a", "response": "", "complete": false}': ":1: .*nothing to train",
        "\n\n": "no examples found",
    }
    for i, (text, message) in enumerate(bad.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(text)
        with pytest.raises(DataError, match=f"bad{i}.jsonl{message}"
                           if message.startswith(":") else message):
            load_examples(path)
    with pytest.raises(DataError, match="file not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_config_validation():
    assert FinetuneConfig().resolved().learning_rate == pytest.approx(1e-3)
    assert FinetuneConfig(lora_rank=0).resolved().learning_rate == pytest.approx(5e-5)
    for bad in (dict(epochs=0), dict(lora_rank=-1), dict(batch_size=0), dict(max_length=1),
                dict(learning_rate=0.0), dict(warmup_ratio=1.0), dict(lora_dropout=1.0)):
        with pytest.raises(ValueError, match="FinetuneConfig"):
            FinetuneConfig(**bad)


@pytest.mark.real_model
def test_real_model_template_and_lora_steps(real_model):
    assert turn_format(real_model).end == "<|im_end|>\n"
    check_encoding(real_model, "How do I bake bread?", "Mix flour, water, yeast and salt.")
    check_encoding(real_model, "Say hi in French.", "Bonjour !\n\nThat means hello.")
    examples = [Example(f"Tell me about animal number {i}.",
                        "I can't help with that request.") for i in range(8)]
    before = state(real_model)
    result = finetune(real_model, examples,
                      FinetuneConfig(epochs=2, batch_size=4, warmup_ratio=0.0), progress=False)
    assert len(result.losses) == 4
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses
    assert result.model.hf.lm_head.weight is result.model.hf.model.embed_tokens.weight
    after = state(real_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
