"""Evaluation reports: a Markdown page and the same page as HTML, with figures beside them.

The HTML is rendered by Python-Markdown (``tables``, ``fenced_code`` and
``sane_lists``), so lists, links, inline code and code blocks look as they do
on GitHub. Raw HTML is not passed through: a ``<`` in a title or a cell
shows as written. Wide tables scroll sideways inside their own box instead of
widening the page, and figures shrink to the page width.
"""

from __future__ import annotations

import html
import xml.etree.ElementTree as etree
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

from diffpilot.fileio import atomic_write_text

MARKDOWN_EXTENSIONS = ("tables", "fenced_code", "sane_lists")

STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}"
    ".table-scroll{overflow-x:auto;max-width:100%;margin:1em 0}"
    "table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 8px}"
    "th{background:#f3f3f3}"
    "img{max-width:100%;height:auto}"
    "code{background:#f3f3f3;padding:0 .2em;border-radius:3px}"
    "pre{background:#f6f8fa;padding:.6em;overflow-x:auto}"
    "pre code{background:none;padding:0}"
)


def _cell(v: Any) -> str:
    """One table cell: floats get 4 significant digits; a ``|`` is escaped and a line break becomes a space."""
    if isinstance(v, float):
        text = f"{v:.4g}"
    else:
        text = "" if v is None else str(v)
    return " ".join(text.replace("|", "\\|").splitlines())


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table; floats get 4 significant digits.

    Without ``columns``, every key of every row, in order of first appearance.
    A ``|`` inside a header or cell is written as ``\\|`` so it stays in its cell.
    """
    if not rows:
        return "_no rows_\n"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class _ScrollTables(Treeprocessor):
    """Put every table in a ``<div class="table-scroll">`` so a wide one scrolls instead of overflowing."""

    def run(self, root: etree.Element) -> None:
        for parent in list(root.iter()):
            for i, child in enumerate(list(parent)):
                if child.tag == "table":
                    box = etree.Element("div", {"class": "table-scroll"})
                    box.tail, child.tail = child.tail, None
                    parent.remove(child)
                    box.append(child)
                    parent.insert(i, box)


class _ReportExtension(Extension):
    """Scrolling tables, and text such as ``<run>`` shown as written rather than taken for raw HTML."""

    def extendMarkdown(self, md: markdown.Markdown) -> None:  # noqa: N802 (Python-Markdown's name)
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.treeprocessors.register(_ScrollTables(md), "scroll_tables", 0)


def _markdown_to_html(md: str, title: str) -> str:
    """A complete HTML page of the Markdown ``md``, titled ``title``."""
    body = markdown.markdown(md, extensions=[*MARKDOWN_EXTENSIONS, _ReportExtension()], output_format="html")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_report(out_dir: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write ``report.md`` and ``report.html``; ``sections`` are (heading, Markdown body) pairs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = f"# {title}\n\n" + "\n".join(f"## {head}\n\n{body}\n" for head, body in sections)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", _markdown_to_html(md, title))
    return out / "report.md"
