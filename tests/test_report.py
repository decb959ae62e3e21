"""Report helpers: exact markdown tables, real PNG files, report.md with its sections and image links."""

import struct

import numpy as np
import torch

from recdistill.report import markdown_table, metric_rows, plot_bars, plot_lines, write_report


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def test_markdown_table_exact():
    rows = [{"model": "teacher", "auc": 0.81234, "n": 3}, {"model": "base", "auc": float("nan"), "extra": True}]
    assert markdown_table(rows, floatfmt=".3f") == (
        "| model | auc | n | extra |\n"
        "|---|---|---|---|\n"
        "| teacher | 0.812 | 3 |  |\n"
        "| base | nan |  | True |")
    assert markdown_table([]) == "(no rows)"


def test_markdown_table_columns_scalars_and_escaping():
    rows = [{"a": np.float32(0.5), "b": torch.tensor(0.25), "c": "x|y\nz", "d": np.int64(7), "e": float("inf")}]
    assert markdown_table(rows, columns=["d", "a", "b", "c", "e"], floatfmt=".2f") == (
        "| d | a | b | c | e |\n|---|---|---|---|---|\n| 7 | 0.50 | 0.25 | x\\|y<br>z | inf |")


def test_metric_rows():
    results = {"base": {"auc/ctr": 0.7, "ne/ctr": 0.9, "auc/cvr": 0.6}, "teacher": {"auc/ctr": 0.8}}
    assert metric_rows(results, "auc") == [{"model": "base", "ctr": 0.7, "cvr": 0.6}, {"model": "teacher", "ctr": 0.8}]
    assert markdown_table(metric_rows(results, "ne"), floatfmt=".1f") == (
        "| model | ctr |\n|---|---|\n| base | 0.9 |\n| teacher |  |")


def test_plots_and_report(tmp_path):
    a = plot_lines(tmp_path / "l.png", [0, 1, 2], {"ctr": [0.7, 0.72, float("nan")], "cvr": [0.6, 0.61, 0.62]},
                   title="AUC per day", xlabel="day", ylabel="AUC", hlines={"Bayes-optimal": 0.8})
    b = plot_bars(tmp_path / "sub" / "b.png", ["ctr", "cvr"], {"base": [0.7, 0.6], "teacher": [0.75, 0.66]},
                  ref={"Bayes-optimal": [0.8, 0.7]}, ylabel="AUC")
    for p in (a, b):
        assert png_size(p) == (704, 440)  # figsize 6.4 x 4.0 inches at 110 dpi
        assert p.stat().st_size > 10_000  # axes, bars, labels and legend drawn, not an empty canvas
    report = write_report(tmp_path, "Title", [("Numbers", "| a |\n|---|\n| 1 |\n"), ("Notes", "text")],
                          images=[a, ("AUC by task", b)])
    assert report == tmp_path / "report.md"
    assert report.read_text() == (
        "# Title\n\n## Numbers\n\n| a |\n|---|\n| 1 |\n\n## Notes\n\ntext\n\n"
        "## Plots\n\n![l](l.png)\n\n![AUC by task](sub/b.png)\n")
