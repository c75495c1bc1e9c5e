"""Atomic figure writes: a finished file or none, never a partial one."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from diffpilot.fileio import save_figure  # noqa: E402


def test_save_figure_writes_the_suffix_format_and_closes(tmp_path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = save_figure(fig, tmp_path / "a.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and not plt.fignum_exists(fig.number)
    fig, _ = plt.subplots()
    assert save_figure(fig, tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.svg"]  # no temp files left


def test_save_figure_leaves_nothing_when_drawing_fails(tmp_path) -> None:
    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, r"$\frac{$")  # invalid mathtext: fails while rendering
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "broken.png")
    assert list(tmp_path.iterdir()) == []
    plt.close(fig)
