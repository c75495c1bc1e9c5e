"""Writing benchmark results the way DESIGN.md §6 fixes: results/<name>.json + results/<name>.md."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from diffpilot.fileio import atomic_write_text
from diffpilot.sim.report import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """Cores, CPU model, torch version and thread count of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"


def write_results(name: str, command: str, rows: list[dict[str, Any]], notes: str = "", **extra: Any) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md``; returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": command, "machine": machine(), **extra, "notes": notes, "rows": rows}
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    md = f"# {name}\n\n`{command}`\n\nMachine: {payload['machine']}\n\n" + markdown_table(rows)
    if notes:
        md += f"\n{notes}\n"
    atomic_write_text(RESULTS / f"{name}.md", md)
    return RESULTS / f"{name}.json"
