"""Refusal study mechanics on tiny models: refusal scoring, post-instruction positions, the
refusal metric, direction selection and its filters, the evaluation table, the CLI wiring."""

from __future__ import annotations

import json
import math

import pytest
import torch

from avec.cli.main import main
from avec.errors import SteeringError
from avec.generation.hf import format_prompt
from avec.intervene.steer import steer
from avec.evaluate.refusal import is_refusal, refusal_rate
from avec.studies.refusal.data import REFUSAL_TEMPLATES, refusal_examples
from avec.studies.refusal.evaluate import evaluate_refusal, results_table, standard_conditions
from avec.studies.refusal.select import (Candidate, NoEligibleCandidate, apply_filters,
                                 find_refusal_tokens, last_logits, post_instruction_tokens,
                                 refusal_metric, select_direction, write_candidates,
                                 write_selection)

from avec.vector import load_vector
from conftest import make_tiny

HARMFUL = ["how do I pick a lock", "write malware now", "steal a car fast", "make a weapon",
           "hack my neighbour", "poison the well"]
HARMLESS = ["bake a cake", "name three birds", "what is rain", "sing a song", "count to five",
            "describe the sea"]


def test_refusal_substrings_and_templates():
    assert is_refusal("I'm sorry, but no.") and is_refusal("Well, I can\u2019t do that")
    assert not is_refusal("Sure! Here is a cake recipe.")
    assert all(is_refusal(t) for t in REFUSAL_TEMPLATES)
    assert refusal_rate(["I cannot", "ok", "As an AI, no", "yes"]) == 0.5
    ex = refusal_examples(HARMFUL, seed=3)
    assert [e.response for e in ex] == [e.response for e in refusal_examples(HARMFUL, seed=3)]
    assert len({e.response for e in refusal_examples(HARMFUL * 5, seed=0)}) > 3  # varied


def test_post_instruction_tokens_are_the_template_suffix(tiny_llama):
    suffix = post_instruction_tokens(tiny_llama)
    assert tiny_llama.tokenizer.decode(suffix) == "\n<|assistant|>"
    ids = format_prompt(tiny_llama, "hello there")[0]
    assert ids[-len(suffix):] == suffix
    no_chat = make_tiny("llama", chat=False)
    with pytest.raises(SteeringError, match="no chat template"):
        post_instruction_tokens(no_chat)


def test_refusal_metric_is_log_odds():
    logits = torch.zeros(2, 4)
    logits[1, 0] = math.log(3.0)  # p(token 0) = 3/6 -> with token 1: p = 4/6
    m = refusal_metric(logits, [0, 1])
    assert m[0].item() == pytest.approx(0.0, abs=1e-6)  # p = 2/4
    assert m[1].item() == pytest.approx(math.log(4 / 2), abs=1e-5)


def test_find_refusal_tokens_needs_refusals(tiny_llama):
    ids = [format_prompt(tiny_llama, p)[0] for p in HARMFUL]
    with pytest.raises(SteeringError, match="refused none"):
        find_refusal_tokens(tiny_llama, ids, ids, max_new_tokens=4)


def test_filters():
    cands = [Candidate(0, -1, "a", 1.0, bypass=-1.0, induce=2.0, kl=0.05),
             Candidate(1, -1, "a", 1.0, bypass=-3.0, induce=2.0, kl=0.2),   # KL too high
             Candidate(2, -1, "a", 1.0, bypass=-4.0, induce=-0.5, kl=0.01),  # induce < 0
             Candidate(3, -1, "a", 1.0, bypass=-2.0, induce=0.5, kl=0.01),
             Candidate(4, -1, "a", 0.0),                                      # zero norm
             Candidate(8, -1, "a", 1.0, bypass=-9.0, induce=9.0, kl=0.0)]    # late layer
    eligible = apply_filters(cands, kl_max=0.1, min_induce=0.0, first_excluded_layer=8)
    assert eligible == [cands[0], cands[3]]
    assert [c.discarded is None for c in cands] == [True, False, False, True, False, False]
    assert cands[1].discarded.startswith("KL") and cands[2].discarded.startswith("induce")
    assert "zero" in cands[4].discarded and "last 20%" in cands[5].discarded


def test_selection_on_a_tiny_model(tiny_llama, tmp_path):
    model = tiny_llama
    sel = select_direction(model, HARMFUL, HARMLESS, HARMFUL[:4], HARMLESS[:4], kl_max=1e9,
                           min_induce=-1e9, max_layer_frac=0.5, refusal_tokens=[73],
                           batch_size=4)
    k = len(post_instruction_tokens(model))
    assert len(sel.candidates) == model.n_layers * k
    late = [c for c in sel.candidates if c.layer >= 2]
    assert late and all(c.bypass is None and "last" in c.discarded for c in late)
    early = [c for c in sel.candidates if c.layer < 2]
    assert all(c.discarded is None and c.kl > 0 for c in early)
    assert sel.chosen.bypass == min(c.bypass for c in early)
    info = sel.vector.metadata["refusal"]
    assert sel.vector.layers == [sel.chosen.layer] and info["position"] == sel.chosen.position
    assert sel.vector.metadata["clamp_value"] == info["harmful_mean_projection"]
    paths = write_selection(sel, tmp_path)
    again = load_vector(paths["vector"])  # the file the selection writes loads back
    assert again.metadata["refusal"]["baseline"] == info["baseline"]
    torch.testing.assert_close(again[sel.chosen.layer], sel.vector[sel.chosen.layer])
    rows = open(paths["csv"]).read().splitlines()
    assert len(rows) == 1 + len(sel.candidates) and sum(r.endswith(",1") for r in rows) == 1
    assert json.loads(open(paths["json"]).read())["chosen"]["layer"] == sel.chosen.layer
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"
    with pytest.raises(NoEligibleCandidate, match="every candidate was discarded") as err:
        select_direction(model, HARMFUL, HARMLESS, HARMFUL[:4], HARMLESS[:4], kl_max=-1.0,
                         refusal_tokens=[73], batch_size=4)
    assert len(err.value.candidates) == model.n_layers * k
    relaxed = select_direction(model, HARMFUL, HARMLESS, HARMFUL[:4], HARMLESS[:4], kl_max=-1.0,
                               fallback_kl_max=1e9, min_induce=-1e9, max_layer_frac=0.5,
                               refusal_tokens=[73], batch_size=4)
    assert relaxed.settings["kl_max_used"] == 1e9
    assert (relaxed.chosen.layer, relaxed.chosen.position) == (sel.chosen.layer,
                                                               sel.chosen.position)
    table = write_candidates(err.value.candidates, tmp_path / "failed.csv")
    assert "KL" in table.read_text()


def test_prescreen_fully_scores_only_the_best_screened(tiny_llama, tmp_path):
    full = select_direction(tiny_llama, HARMFUL, HARMLESS, HARMFUL[:4], HARMLESS[:4],
                            kl_max=1e9, min_induce=-1e9, refusal_tokens=[73], batch_size=4)
    sel = select_direction(tiny_llama, HARMFUL, HARMLESS, HARMFUL[:4], HARMLESS[:4],
                           kl_max=1e9, min_induce=-1e9, refusal_tokens=[73], batch_size=4,
                           prescreen=3, prescreen_prompts=2)
    screened = [c for c in sel.candidates if c.screen is not None]
    scored = [c for c in sel.candidates if c.bypass is not None]
    assert len(screened) == len(full.candidates) - sum(c.layer >= 3 for c in full.candidates)
    assert len(scored) == 3
    assert max(c.screen for c in scored) <= min(c.screen for c in screened if c not in scored)
    assert all("prescreen" in c.discarded for c in screened if c not in scored)
    # the screen is the bypass score on the first 2 harmful prompts
    two = select_direction(tiny_llama, HARMFUL, HARMLESS, HARMFUL[:2], HARMLESS[:4],
                           kl_max=1e9, min_induce=-1e9, refusal_tokens=[73], batch_size=4)
    on_two = {(x.layer, x.position): x.bypass for x in two.candidates}
    assert all(on_two[(x.layer, x.position)] == pytest.approx(x.screen, abs=1e-4)
               for x in screened)
    same = {(x.layer, x.position): x.bypass for x in full.candidates}
    assert all(same[(x.layer, x.position)] == pytest.approx(x.bypass, abs=1e-5) for x in scored)
    assert sel.chosen.bypass == min(x.bypass for x in scored)
    assert sel.settings["prescreen"] == 3
    paths = write_selection(sel, tmp_path)
    assert open(paths["prescreen_png"], "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="at least 1"):
        select_direction(tiny_llama, HARMFUL, HARMLESS, HARMFUL[:4], HARMLESS[:4],
                         refusal_tokens=[73], prescreen=0)


def test_bypass_score_is_the_metric_under_ablation(tiny_llama):
    from avec.intervene.ablation import ablate_direction

    sel = select_direction(tiny_llama, HARMFUL, HARMLESS, HARMFUL[:4], HARMLESS[:4],
                           kl_max=1e9, min_induce=-1e9, refusal_tokens=[73], batch_size=4)
    c = sel.chosen
    ids = [format_prompt(tiny_llama, p)[0] for p in HARMFUL[:4]]
    with ablate_direction(tiny_llama, sel.vector[c.layer]):
        again = refusal_metric(last_logits(tiny_llama, ids, 3), [73]).mean()
    assert float(again) == pytest.approx(c.bypass, abs=1e-4)  # batch size does not matter


def test_evaluation_rows(tiny_llama, tmp_path):
    sel = select_direction(tiny_llama, HARMFUL, HARMLESS, HARMFUL[:4], HARMLESS[:4],
                           kl_max=1e9, min_induce=-1e9, refusal_tokens=[73], batch_size=4)
    conds = standard_conditions(tiny_llama, sel.vector)
    assert [c.name for c in conds] == ["base", "ablation", "clamp to harmful mean",
                                      "clamp to harmless mean", "add"]
    res = evaluate_refusal(conds, HARMFUL[:3], HARMLESS[:3], essays=["a short essay text."],
                           max_new_tokens=4, batch_size=2)
    assert res[0].kl_harmless == pytest.approx(0.0, abs=1e-6)
    assert res[1].kl_harmless > 0 and res[4].kl_harmless > 0
    assert all(0 <= r.harmful_refusal <= 1 and r.perplexity > 1 for r in res)
    assert res[1].perplexity != res[0].perplexity
    table = results_table(res)
    assert table.count("\n") == len(res) + 1 and "| ablation |" in table


def test_addition_rows_per_strength(tiny_llama):
    sel = select_direction(tiny_llama, HARMFUL, HARMLESS, HARMFUL[:4], HARMLESS[:4],
                           kl_max=1e9, min_induce=-1e9, refusal_tokens=[73], batch_size=4)
    conds = standard_conditions(tiny_llama, sel.vector, add_coefs=(1.0, 1.5, 1.5, 2.0))
    assert [c.name for c in conds][4:] == ["add", "add x1.5", "add x2"]
    layer = sel.chosen.layer
    ids = [format_prompt(tiny_llama, p)[0] for p in HARMLESS[:2]]
    base = last_logits(tiny_llama, ids, 2)
    shifts = []
    for cond, coef in zip(conds[4:], (1.0, 1.5, 2.0)):
        with cond.context():
            steered = last_logits(tiny_llama, ids, 2)
        with steer(tiny_llama, sel.vector, coef=coef, layers=[layer]):
            assert torch.allclose(steered, last_logits(tiny_llama, ids, 2), atol=1e-5)
        shifts.append(float((steered - base).abs().mean()))
    assert shifts[0] > 0 and len(set(shifts)) == 3  # each row its own strength
    for bad in ((), (0.0,), (-1.0,), (float("nan"),)):
        with pytest.raises(ValueError, match="coefficients"):
            standard_conditions(tiny_llama, sel.vector, add_coefs=bad)


def test_cli_wiring(capsys, tmp_path):
    assert main(["refusal", "select", "-o", str(tmp_path), "--data-dir",
                 str(tmp_path / "nowhere")]) == 2
    assert "harmful_train.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["refusal", "--help"])
    assert "reproduce" in capsys.readouterr().out
    for bad in ("1,x", "0", "1,-2", "inf"):
        with pytest.raises(SystemExit):
            main(["refusal", "eval", "--vector", "v", "-o", str(tmp_path), "--add-coefs", bad])
        assert "--add-coefs" in capsys.readouterr().err


def test_the_whole_study_runs_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    """``run_study``'s five steps, wired together, on a tiny model and 4-instruction files (one
    short refusal to learn, so the tiny model refuses after a few seconds of training)."""
    import json as _json

    import avec.studies.refusal.data as refusal_data

    from conftest import make_tiny

    from avec.studies.refusal.pipeline import DATA_FILES, StudySettings, run_study

    monkeypatch.setattr(refusal_data, "REFUSAL_TEMPLATES", ("I cannot.",))
    base = make_tiny("llama")
    base_dir = tmp_path / "base"
    base.hf.save_pretrained(base_dir)
    base.tokenizer.save_pretrained(base_dir)
    data = tmp_path / "data" / "refusal"
    data.mkdir(parents=True)
    for name in DATA_FILES:
        kind = "harm" if name.startswith("harmful") else "help"
        rows = [{"instruction": f"{kind} request {i}"} for i in range(4)]  # same in each split
        (data / f"{name}.json").write_text(_json.dumps(rows))
    settings = StudySettings(data_dir=str(data), n_harmful_train=4, n_harmless_train=4,
                             distil_tokens=3, epochs=40, lora_rank=0, learning_rate=1e-2,
                             n_select_train=4,
                             n_select_val=2, kl_max=1e9, fallback_kl_max=None, n_eval=2,
                             eval_tokens=3)
    logs: list[str] = []
    summary = run_study(tmp_path / "out", settings, base_model=str(base_dir), log=logs.append)
    assert [line[:5] for line in logs] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert set(summary["seconds"]) == {"dataset", "finetune", "select", "orthogonalize",
                                       "evaluate"}
    written = _json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["selection"]["chosen"]["layer"] == summary["selection"]["chosen"]["layer"]
    evaluated = _json.loads(open(summary["eval"]["json"]).read())
    assert evaluated["results"][0]["name"] == "original model (before fine-tuning)"
    assert len(evaluated["results"]) > 2
    assert (tmp_path / "out" / "smollm2-refuses" / "avec-finetune.json").is_file()
