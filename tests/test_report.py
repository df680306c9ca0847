"""``avec.report``: the one writer of JSON, CSV, figures and HTML pages."""

from __future__ import annotations

import csv
import json
import math

import pytest

from avec.report import (heatmap, html_page, img, png_data_uri, save_figure, pyplot, write_csv,
                         write_html, write_json)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_write_json_creates_parents_keeps_unicode_and_ends_with_newline(tmp_path):
    path = write_json(tmp_path / "a" / "b.json", {"concept": "café", "x": [1, 2]})
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and "café" in text
    assert json.loads(text) == {"concept": "café", "x": [1, 2]}


def test_write_csv_rows(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["layer", "score"], ([L, L / 2] for L in range(3)))
    rows = list(csv.reader(path.open()))
    assert rows == [["layer", "score"], ["0", "0.0"], ["1", "0.5"], ["2", "1.0"]]


def test_heatmap_writes_a_png_and_checks_its_labels(tmp_path):
    values = [[0.1, 0.2, math.nan], [0.4, 0.5, 0.6]]
    path = heatmap(values, tmp_path / "h.png", rows=[3, 4], cols=["0", "1", "2"], title="t",
                   marks=[(0, 1, "x")], star=(1, 2))
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="labels 2 x 2"):
        heatmap(values, tmp_path / "bad.png", rows=[3, 4], cols=["0", "1"])
    assert not (tmp_path / "bad.png").exists()


def test_save_figure_closes_the_figure(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    before = len(plt.get_fignums())
    save_figure(fig, tmp_path / "f.png")
    assert len(plt.get_fignums()) == before - 1
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG_MAGIC


def test_html_page_escapes_the_title_and_embeds_images(tmp_path):
    plt = pyplot()
    fig, _ = plt.subplots()
    png = save_figure(fig, tmp_path / "p.png")
    tag = img(png, 'a "plot"')
    assert tag.startswith('<img src="data:image/png;base64,') and "&quot;plot&quot;" in tag
    assert png_data_uri(png) in tag
    page = html_page("<b>x</b>", "<p>body</p>", css="p{color:red}")
    assert "<title>&lt;b&gt;x&lt;/b&gt;</title>" in page and "<p>body</p>" in page
    assert "p{color:red}" in page and page.startswith("<!doctype html>")
    path = write_html(tmp_path / "r" / "report.html", "t", "<p>hi</p>")
    assert path.read_text(encoding="utf-8") == html_page("t", "<p>hi</p>")
