"""Evaluation reports: the Markdown page and its HTML rendering, checked by parsing the HTML."""

from __future__ import annotations

from html.parser import HTMLParser

from diffpilot.sim.report import markdown_table, write_report


class _Tree(HTMLParser):
    """Every element as (tag, attrs, text inside it, ancestor tags), in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": [e["tag"] for e in self._open]}
        self.elements.append(el)
        if tag not in ("img", "meta", "br", "hr"):
            self._open.append(el)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self._open:
            el["text"] += data

    def find(self, tag):
        return [e for e in self.elements if e["tag"] == tag]


def _parse(text: str) -> _Tree:
    tree = _Tree()
    tree.feed(text)
    tree.close()
    return tree


ROWS = [{"policy": "flow", "success": 0.91234, "nfe": 1}, {"policy": "ddim", "success": 0.5, "nfe": 10, "note": "slow"}]


def test_markdown_table_columns_floats_and_missing_cells():
    md = markdown_table(ROWS)
    assert md.splitlines() == [
        "| policy | success | nfe | note |",
        "|---|---|---|---|",
        "| flow | 0.9123 | 1 |  |",
        "| ddim | 0.5 | 10 | slow |",
    ]
    assert markdown_table(ROWS, ["nfe"]).splitlines()[2] == "| 1 |"
    assert markdown_table([]) == "_no rows_\n"


def test_markdown_table_keeps_a_pipe_inside_its_cell(tmp_path):
    md = markdown_table([{"rule a|b": "x | y", "n": "two\nlines"}])
    assert md.splitlines()[0] == "| rule a\\|b | n |"
    assert md.splitlines()[2] == "| x \\| y | two lines |"
    write_report(tmp_path, "Pipes", [("Table", md)])
    tree = _parse((tmp_path / "report.html").read_text())
    assert [th["text"] for th in tree.find("th")] == ["rule a|b", "n"]
    assert [td["text"] for td in tree.find("td")] == ["x | y", "two lines"]


def test_report_html_has_real_lists_links_code_tables_and_images(tmp_path):
    wide = {f"column_{i}": float(i) for i in range(30)}
    sections = [
        ("Summary", "Runs:\n\n- first run\n- second run\n\nSee [the STL report](stl/report.md) and `diffpilot eval`.\n"),
        ("Results", markdown_table(ROWS) + "\n" + markdown_table([wide])),
        ("Figure", "![success rate](success.png)\n"),
        ("Reproduce", "```\ndiffpilot eval ckpt=<run>/last.pt\n```\n"),
    ]
    path = write_report(tmp_path, "Eval <flow>", sections)
    assert path == tmp_path / "report.md"
    md = path.read_text()
    assert md.startswith("# Eval <flow>\n\n## Summary\n") and "## Reproduce" in md
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files behind

    page = (tmp_path / "report.html").read_text()
    tree = _parse(page)
    assert [t["text"] for t in tree.find("title")] == ["Eval <flow>"]
    assert [h["text"] for h in tree.find("h1")] == ["Eval <flow>"]
    assert [h["text"] for h in tree.find("h2")] == ["Summary", "Results", "Figure", "Reproduce"]

    # a list, not "- ..." paragraphs
    assert len(tree.find("ul")) == 1
    assert [li["text"].strip() for li in tree.find("li")] == ["first run", "second run"]
    assert all(not p["text"].lstrip().startswith("- ") for p in tree.find("p"))

    # a link, not raw [text](path)
    links = tree.find("a")
    assert [(a["attrs"]["href"], a["text"]) for a in links] == [("stl/report.md", "the STL report")]
    assert "](" not in "".join(p["text"] for p in tree.find("p"))

    # inline code without backticks, and the fenced block as pre > code with its text unchanged
    codes = tree.find("code")
    inline = [c for c in codes if "pre" not in c["parents"]]
    block = [c for c in codes if "pre" in c["parents"]]
    assert [c["text"] for c in inline] == ["diffpilot eval"]
    assert [c["text"] for c in block] == ["diffpilot eval ckpt=<run>/last.pt\n"]
    assert "`" not in page.split("<body>", 1)[1]

    # two tables, each in a horizontally scrolling box
    tables = tree.find("table")
    assert len(tables) == 2
    assert len(tree.find("th")) == 4 + 30
    assert len(tree.find("td")) == 2 * 4 + 30
    assert len(tree.find("tr")) == 3 + 2
    boxes = [d for d in tree.find("div") if d["attrs"].get("class") == "table-scroll"]
    assert len(boxes) == 2
    assert all(t["parents"][-1] == "div" for t in tables)
    style = "".join(s["text"] for s in tree.find("style"))
    assert ".table-scroll{overflow-x:auto" in style and "img{max-width:100%" in style

    imgs = tree.find("img")
    assert [(i["attrs"]["src"], i["attrs"]["alt"]) for i in imgs] == [("success.png", "success rate")]


def test_rewriting_a_report_replaces_both_files(tmp_path):
    write_report(tmp_path, "First", [("A", "one\n")])
    write_report(tmp_path, "Second", [("B", "two\n")])
    assert (tmp_path / "report.md").read_text().startswith("# Second\n")
    tree = _parse((tmp_path / "report.html").read_text())
    assert [h["text"] for h in tree.find("h1")] == ["Second"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md"]
