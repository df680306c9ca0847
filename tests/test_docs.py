"""The README stays a front door and every relative link in it and in docs/ resolves (no network).

The full check (anchors, the nav, the API page) is `make docs` (mkdocs --strict), run by
`make test` before pytest; this test catches the common breakage in milliseconds.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# folders outside docs/ that docs/hooks.py publishes into the site at the same relative path
PUBLISHED = ("experiments/", "bench/")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [m.group(1) for m in LINK.finditer(text)]


def _relative(target: str) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        return None  # a URL (http:, mailto:) or an anchor on the same page
    return target.split("#", 1)[0]


def _resolves(md: Path, target: str) -> bool:
    candidate = (md.parent / target).resolve()
    if candidate.exists():
        return True
    docs = DOCS.resolve()
    # a link into the published result folders, written as if they sat under docs/
    if docs in md.resolve().parents and candidate.is_relative_to(docs):
        rel = candidate.relative_to(docs).as_posix()
        return rel.startswith(PUBLISHED) and (ROOT / rel).exists()
    return False


def test_readme_is_at_most_250_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


MARKDOWN = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("md", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    broken = []
    for target in _links(md):
        rel = _relative(target)
        if rel and not _resolves(md, rel):
            broken.append(target)
    assert not broken, f"{md.relative_to(ROOT)} links to missing files: {broken}"


def test_link_check_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](missing.md#x) [web](https://example.org) `[no](code.md)`")
    assert [t for t in _links(page) if _relative(t) and not _resolves(page, _relative(t))] == [
        "missing.md#x"
    ]
