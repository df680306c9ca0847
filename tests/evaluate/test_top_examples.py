"""Top-activating examples: projections, ranking, corpus loading and HTML."""

from __future__ import annotations

import torch

from avec.evaluate.top_examples import load_corpus, render_html, token_projections, top_examples

TEXTS = ["The sea is wide", "a <b>bold</b> & tag", "Numbers 1 2 3", "hello"]


def test_projections_match_hidden_states(tiny_llama):
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(tiny_llama.d_model, generator=g)
    proj = token_projections(tiny_llama, TEXTS, direction, 1, batch_size=3)
    unit = direction / direction.norm()
    for text, (ids, scores) in zip(TEXTS, proj):
        with torch.no_grad():
            hs = tiny_llama.hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(torch.tensor(scores), hs @ unit, rtol=1e-4, atol=1e-4)
        assert ids == tiny_llama.encode([text])[0]


def test_ranking_and_html(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(tiny_llama.d_model, generator=g)
    ex = top_examples(tiny_llama, TEXTS, direction, 2, k=3)
    assert len(ex) == 3
    assert [e.score for e in ex] == sorted((e.score for e in ex), reverse=True)
    for e in ex:
        assert e.token_index >= 1 and e.score == max(e.scores[1:])
    page = render_html(ex, "Top <examples>")
    assert "Top &lt;examples&gt;" in page and "<script" not in page
    if any(e.text_index == 1 for e in ex):
        assert "&lt;b&gt;" in page or "&amp;" in page
    f = tmp_path / "c.txt"
    f.write_text("para one\nstill one\n\npara two\n\n\n")
    assert load_corpus([f]) == ["para one\nstill one", "para two"]
