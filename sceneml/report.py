"""A study write-up as one self-contained HTML page and a Markdown twin: pure rendering, no MLflow.

A report is a list of :class:`Section`; a section holds paragraphs (``str``), :class:`Table` and
:class:`Image` parts. Tables are formatted once (:func:`formatted`, 3 decimals), so the HTML and the
Markdown show the same text. Images are embedded as base64 (PNG for plots, JPEG for photo galleries):
the page needs no network and no other file, so it opens from disk and in the MLflow UI's artifact
viewer alike.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from numbers import Integral, Real

import pandas as pd

DECIMALS = 3


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""
    facts: bool = False  # a what/value list: left-aligned text rather than columns of numbers


@dataclass
class Image:
    data: bytes
    caption: str
    mime: str = "image/png"


@dataclass
class Section:
    title: str
    parts: list[str | Table | Image] = field(default_factory=list)


def number(value: object) -> str:
    """How every value is written: floats with 3 decimals, ints as they are, NaN as ``n/a``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        return "n/a" if math.isnan(value) else f"{float(value):.{DECIMALS}f}"
    return str(value)


def formatted(frame: pd.DataFrame) -> pd.DataFrame:
    """The table as text, each cell through :func:`number` (pandas would print ints in a float column as 1.0)."""
    return pd.DataFrame({col: [number(v) for v in frame[col].astype(object)] for col in frame.columns})


def key_values(pairs: dict[str, object]) -> Table:
    """A two-column table of facts (``what``, ``value``)."""
    return Table(pd.DataFrame({"what": list(pairs), "value": [number(v) for v in pairs.values()]}), facts=True)


# --------------------------------------------------------------------------------------------- html

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child, table.facts td { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #555; }
nav ol { columns: 2; }
"""


def _html_table(table: Table) -> str:
    body = formatted(table.frame).to_html(index=False, escape=True, border=0,
                                          classes="facts" if table.facts else None)
    if table.caption:  # pandas writes no <caption>: put it right after the opening tag
        end = body.index(">") + 1
        body = f"{body[:end]}\n<caption>{html.escape(table.caption)}</caption>{body[end:]}"
    return body


def _html_part(part: str | Table | Image) -> str:
    if isinstance(part, Table):
        return _html_table(part)
    if isinstance(part, Image):
        data = base64.b64encode(part.data).decode("ascii")
        return (f'<figure><img alt="{html.escape(part.caption)}" src="data:{part.mime};base64,{data}">'
                f"<figcaption>{html.escape(part.caption)}</figcaption></figure>")
    return f"<p>{html.escape(part)}</p>"


def render_html(title: str, sections: list[Section]) -> str:
    anchors = [f"s{i}" for i in range(1, len(sections) + 1)]
    toc = "".join(f'<li><a href="#{a}">{html.escape(s.title)}</a></li>' for a, s in zip(anchors, sections))
    body = "\n".join(f'<section id="{a}"><h2>{i}. {html.escape(s.title)}</h2>\n'
                     + "\n".join(_html_part(p) for p in s.parts) + "</section>"
                     for i, (a, s) in enumerate(zip(anchors, sections), 1))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n<nav><ol>{toc}</ol></nav>\n"
            f"{body}\n</body></html>\n")


# ----------------------------------------------------------------------------------------- markdown

def _markdown_part(part: str | Table | Image) -> str:
    if isinstance(part, Table):
        text = formatted(part.frame).to_markdown(index=False, disable_numparse=True)
        return f"**{part.caption}**\n\n{text}" if part.caption else text
    if isinstance(part, Image):
        return f"*Figure (in report.html): {part.caption}*"
    return part


def render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}"]
    for i, section in enumerate(sections, 1):
        out.append(f"## {i}. {section.title}")
        out += [_markdown_part(p) for p in section.parts]
    return "\n\n".join(out) + "\n"
