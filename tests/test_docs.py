"""The manual holds together: every relative link in README.md, docs/ and benchmarks/README.md points at a
file (and a heading, for `#anchors`) that exists, the README stays a short manual, and no page speaks
of how the project was made rather than of what it does."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")

# wording about the making of the project, not about the software
MAKING_OF = [r"\bwas lent\b", r"\bno GPU was\b", r"\bthis task\b", r"\bround (two|three)\b", r"\bissue asks\b",
             r"\btarget[^.\n]*: (met|missed)\b", r"\*\*missed\*\*", r"^## Status", r"\bare gone\b", r"\bas before\b",
             r"\bwe (keep|left|read|chose|tried)\b", r"\b(later|earlier) that day\b", r"\bthe same day\b",
             r"\bthat moment\b", r"\bon purpose\b", r"\bwhat \w+ logged before\b", r"\bsceneml 0\.1\b",
             r"\b\d\d:\d\d UTC\b", r"\bat half (speed|the pace)\b"]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [m.group(1) for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m.group(1))]


def test_anchor_rule_on_known_headings():
    assert _anchor("The report (`report`)") == "the-report-report"
    assert _anchor("Many workers, one search") == "many-workers-one-search"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.exists()
    broken = []
    for link in _links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(link)
    assert not broken, f"{page.name}: {broken}"


def test_readme_is_a_short_manual():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    for page in ["data", "training", "study", "search", "analysis", "serving", "scaling-out", "reliability",
                 "architecture", "parameters"]:
        assert (ROOT / "docs" / f"{page}.md").exists(), page


def test_no_page_or_comment_speaks_of_its_making():
    files = [*PAGES, ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / "benchmarks" / "README.md.j2",
             *(ROOT / "sceneml").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "entrypoints").iterdir(),
             *(p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_docs.py")]
    found = [f"{f.relative_to(ROOT)}: {m.group(0)!r}" for f in files
             for rx in MAKING_OF for m in re.finditer(rx, f.read_text(), flags=re.M | re.I)]
    assert not found, found


def test_the_search_page_names_exactly_the_parameters_tune_may_search():
    from sceneml.config import SEARCHABLE

    listed = re.search(r"\(searchable: ([^:]+):", (ROOT / "docs" / "search.md").read_text()).group(1)
    assert [name.strip() for name in listed.split(",")] == list(SEARCHABLE)


def test_the_benchmarks_page_is_what_its_results_render():
    """benchmarks/README.md is rendered from benchmarks/results/*.csv: a figure on it that no row holds, or a
    row it does not show, fails here (`python benchmarks/render.py` rewrites it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import render
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert (ROOT / "benchmarks" / "README.md").read_text() == render.render()
    rows = render.read("time_to_accuracy")
    assert rows and all(row["date"] and row["machine"] and row["command"] for row in rows)
