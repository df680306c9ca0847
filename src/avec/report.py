"""Writing results: JSON and CSV files, matplotlib figures and heatmaps, self-contained HTML pages
with embedded PNGs. Every study and command that leaves files behind writes them through here,
so all reports share one look and one set of conventions:

- JSON ends with a newline, keeps non-ASCII text as is and creates the parent folder;
- figures use matplotlib's ``Agg`` back-end (no display), are saved at ``dpi`` 120 by default
  and closed, so a long run does not accumulate open figures;
- an HTML page is one file (styles inline, images as ``data:`` URIs) that can be mailed or
  attached to an issue as it is.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

esc = html.escape

BASE_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;line-height:1.45}"
            "table{border-collapse:collapse;margin:.5em 0}"
            "td,th{border-bottom:1px solid #ddd;padding:.35em .6em;vertical-align:top;"
            "text-align:left}"
            "td.n{white-space:nowrap;font-variant-numeric:tabular-nums}"
            "td.t{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:.9em}"
            "img{max-width:100%}")


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> Path:
    """``obj`` as JSON in ``path`` (parents created, trailing newline, UTF-8 as is);
    ``default`` converts what JSON cannot hold (e.g. ``str`` for paths)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False, default=default) + "\n",
                    encoding="utf-8")
    return path


def write_csv(path: str | Path, header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV file with one header row (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(header))
        writer.writerows(list(r) for r in rows)
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the ``Agg`` back-end (imported on first use: matplotlib is only
    needed by commands that draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Lay out, save (parents created) and close ``fig``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def heatmap(values: Sequence[Sequence[float]], path: str | Path, *,
            rows: Sequence[Any], cols: Sequence[Any], title: str = "", xlabel: str = "",
            ylabel: str = "", colorbar: str | None = None, cmap: str = "viridis",
            annotate: str | None = "{:.2f}", marks: Sequence[tuple[int, int, str]] = (),
            star: tuple[int, int] | None = None, figsize: tuple[float, float] | None = None,
            tick_fontsize: float | None = None, title_fontsize: float | None = None,
            dpi: int = 120) -> Path:
    """A ``rows`` x ``cols`` grid of ``values`` as a PNG. NaN cells stay blank.

    ``annotate`` formats each finite value into its cell (``None``: no numbers); ``marks`` puts
    a short text at ``(row, col)`` cells; ``star`` marks one cell (e.g. the chosen setting) with
    a red star.
    """
    import numpy as np

    grid = np.asarray(values, dtype=float)
    if grid.shape != (len(rows), len(cols)):
        raise ValueError(f"heatmap: values have shape {grid.shape}, labels "
                         f"{len(rows)} x {len(cols)}")
    plt = pyplot()
    if figsize is None:
        figsize = (max(6.0, 1.6 + 0.75 * len(cols)), max(3.0, 1.2 + 0.38 * len(rows)))
    fig, ax = plt.subplots(figsize=figsize)
    im = ax.imshow(grid, aspect="auto", cmap=cmap)
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=tick_fontsize)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_fontsize)
    finite = grid[np.isfinite(grid)]
    if annotate is not None and finite.size:
        middle = (float(finite.max()) + float(finite.min())) / 2
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = float(grid[i, j])
                if math.isfinite(v):
                    ax.text(j, i, annotate.format(v), ha="center", va="center", fontsize=7,
                            color="white" if v < middle else "black")
    for i, j, text in marks:
        ax.text(j, i, text, ha="center", va="center", color="white", fontsize=7)
    if star is not None:
        ax.scatter([star[1]], [star[0]], marker="*", s=160, color="red")
    fig.colorbar(im, ax=ax, label=colorbar or "")
    return save_figure(fig, path, dpi=dpi)


def png_data_uri(path: str | Path) -> str:
    """A PNG file as a ``data:`` URI for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def img(path: str | Path, alt: str) -> str:
    """An ``<img>`` tag that embeds the PNG at ``path``."""
    return f'<img src="{png_data_uri(path)}" alt="{esc(alt)}">'


def html_page(title: str, body: str, *, css: str = "") -> str:
    """A complete HTML document: ``title`` (escaped here), the shared styles plus ``css``, and
    ``body`` (HTML, already escaped by the caller)."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{BASE_CSS}{css}</style></head><body>\n{body}\n</body></html>\n")


def write_html(path: str | Path, title: str, body: str, *, css: str = "") -> Path:
    """:func:`html_page` written to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_page(title, body, css=css), encoding="utf-8")
    return path
