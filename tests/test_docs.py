"""The manual holds together: every relative link in README.md, docs/ and benchmarks/README.md points at a
file (and a heading, for `#anchors`) that exists, the README stays a short manual, and no page speaks
of how the project was made rather than of what it does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")

# wording about the making of the project, not about the software
MAKING_OF = [r"\bwas lent\b", r"\bno GPU was\b", r"\bthis task\b", r"\bround (two|three)\b", r"\bissue asks\b",
             r"\btarget[^.\n]*: (met|missed)\b", r"\*\*missed\*\*", r"^## Status", r"\bare gone\b"]


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
    files = [*PAGES, ROOT / "Makefile", ROOT / "pyproject.toml", *(ROOT / "sceneml").rglob("*.py"),
             *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "entrypoints").glob("*.py")]
    found = [f"{f.relative_to(ROOT)}: {m.group(0)!r}" for f in files
             for rx in MAKING_OF for m in re.finditer(rx, f.read_text(), flags=re.M | re.I)]
    assert not found, found


def test_the_search_page_names_exactly_the_parameters_tune_may_search():
    from sceneml.config import SEARCHABLE

    listed = re.search(r"\(searchable: ([^:]+):", (ROOT / "docs" / "search.md").read_text()).group(1)
    assert [name.strip() for name in listed.split(",")] == list(SEARCHABLE)
