"""report.py: the log.jsonl reader survives what a killed run leaves, tables and files say what the
values are."""
from __future__ import annotations

import json
import os

from PIL import Image

import distill_loss
import report
from config import TrainConfig


def test_read_log_skips_missing_file_and_broken_lines(tmp_path):
    assert report.read_log(str(tmp_path)) == [] and report.loss_curve(str(tmp_path)) == []
    lines = [{"epoch": 0, "loss": None}, {"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.5}]
    # a kill cut the last line
    text = "\n".join(json.dumps(r) for r in lines) + '\n[1, 2]\n{"epoch": 3, "lo'
    (tmp_path / "log.jsonl").write_text(text)
    assert report.read_log(str(tmp_path)) == lines
    # epoch 0 is logged before training: no loss
    assert report.loss_curve(str(tmp_path)) == [(1, 0.9), (2, 0.5)]


def test_markdown_table_cells():
    rows = [{"name": "a", "acc": 12.345, "ok": True, "d": {"x": None}}]
    columns = [
        ("name", "name", "s"),
        ("acc %", "acc", ".2f"),
        ("ok", "ok", ""),
        ("x", lambda r: r["d"]["x"], ".3f"),
    ]
    assert report.markdown_table(rows, columns, missing="–").splitlines() == [
        "| name | acc % | ok | x |", "|---|---|---|---|", "| a | 12.35 | yes | – |"]


def test_write_files_json_markdown_png(tmp_path):
    png = report.plot_png(
        {"kd": [(2, 40.0), (1, 30.0)]}, {"teacher": 80.0}, {"kd": [(1, 0.9), (2, 0.5)]}, "t"
    )
    path = str(tmp_path / "out" / "results.json")
    report.write_files(path, {"acc": float("nan")}, "# table\n", png)
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "results.md", "results.png"]
    assert json.load(open(path)) == {"acc": None}  # strict JSON: NaN is null
    with Image.open(tmp_path / "out" / "results.png") as image:
        assert image.format == "PNG" and image.size[0] > 200


def test_plot_marks_chance_collapse_and_names_the_loss():
    """What a reader of the figure needs (issue 13, item 15): a random teacher named so, the chance
    level, the collapsed checkpoints and which loss the lower panel shows."""
    loss = distill_loss.describe(TrainConfig())
    fig = report.plot_figure(
        {"student linear probe": [(1, 30.0), (2, 12.0)]},
        {"teacher (random init) linear probe": 40.0},
        {"training loss": [(1, 0.9), (2, 0.5)]},
        "kd: imagefolder cifar10-jpeg, 10 classes",
        chance=10.0,
        collapsed=[(2, 12.0)],
        loss_name=loss,
    )
    top, bottom = fig.axes
    lines = {line.get_label(): line for line in top.get_lines()}
    assert list(lines["chance (10 %)"].get_ydata()) == [10.0, 10.0]
    assert list(lines["collapsed (centered eff. rank < 1.5)"].get_xydata()[0]) == [2.0, 12.0]
    assert "teacher (random init) linear probe" in top.get_legend_handles_labels()[1]
    assert (
        bottom.get_title()
        == "training loss: 1·(1−cos) CLS + 0.5·(1−cos) patch tokens, vs the teacher"
    )
    supervised = distill_loss.describe(TrainConfig(objective="supervised"))
    assert supervised == "cross-entropy of the linear head on the labels"
    assert top.get_title() == "kd: imagefolder cifar10-jpeg, 10 classes"
    assert report.png_bytes(fig).startswith(b"\x89PNG")
