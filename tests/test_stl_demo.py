"""The demo's STL section: a compliance report of the STL flow planner trained on the demo's driving data."""

from __future__ import annotations

import json

import yaml

from diffpilot.jobs import _demo_stl
from diffpilot.stl_jobs import DEFAULTS_FILE


def test_demo_stl_section_reports_the_planner_on_val_windows(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DIFFPILOT_CACHE", str(tmp_path / "cache"))
    demo = yaml.safe_load((DEFAULTS_FILE.parent / "demo.yaml").read_text())
    assert demo["stl"]["source"] == "planner" and demo["stl"]["planner"]["guidance"]
    stl = {**demo["stl"], "data": {"num_scenes": 6, "seed": 1, "val_fraction": 0.34, "workers": 1},
           "max_scenes": 1, "max_windows": 4, "worst": 1,
           "planner": {**demo["stl"]["planner"], "train_steps": 10, "samples": 2}}
    [(title, body)] = _demo_stl(stl, tmp_path / "demo" / "stl")
    folder = tmp_path / "demo" / "stl"
    summary = json.loads((folder / "compliance.json").read_text())
    assert summary["windows"] == 4 and summary["trajectories"] == 8
    assert "STL" in title and "[stl/report.md](stl/report.md)" in body
    for row in summary["rules"]:  # the demo's table is the report's own table
        assert f"| {row['rule']} | {row['applicable']} | {row['satisfied']} |" in body
    assert (folder / "controllability.png").stat().st_size > 0 and "stl/controllability.png" in body
    assert "planner" in (folder / "report.md").read_text()
