"""Evaluation reports: a Markdown page and the same page as HTML, with figures beside them."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffpilot.fileio import atomic_write_text


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table; floats get 4 significant digits.

    Without ``columns``, every key of every row, in order of first appearance.
    """
    if not rows:
        return "_no rows_\n"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _markdown_to_html(md: str, title: str) -> str:
    """Enough Markdown for our reports: headings, tables, images, code, paragraphs."""
    out, in_table, in_code = [], False, False
    for line in md.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}" style="max-width:100%"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"


def write_report(out_dir: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write ``report.md`` and ``report.html``; ``sections`` are (heading, Markdown body) pairs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = f"# {title}\n\n" + "\n".join(f"## {head}\n\n{body}\n" for head, body in sections)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", _markdown_to_html(md, title))
    return out / "report.md"
