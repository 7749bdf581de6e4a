"""Probes as a table: a probe registered here, in the test file only, shows in eval_results.json,
the evaluator's markdown and summary lines, and the experiment report's rows, intervals and tables;
result files written before a probe existed still load."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import distill_trainer
import evaluate_checkpoints as ev
import metrics
import report
import run_experiments
from helpers import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def nearest_centroid(d: metrics.ProbeData):
    """Test top-1 % of the nearest class mean (cosine): a protocol the repo does not have."""
    train = F.normalize(d.train_x.float(), dim=1)
    labels = torch.as_tensor(d.train_y).long().to(train.device)
    means = torch.zeros(d.num_classes, train.shape[1]).index_add_(0, labels, train)
    predicted = (F.normalize(d.test_x.float(), dim=1) @ F.normalize(means, dim=1).T).argmax(1)
    correct = int((predicted == torch.as_tensor(d.test_y).to(predicted.device)).sum())
    return {"acc": 100.0 * correct / len(predicted), "centroid_classes": d.num_classes}


TOY = metrics.Probe("centroid_acc", "centroid %", "pooled", nearest_centroid,
                    "centroid: nearest class mean, cosine.")


@pytest.fixture
def toy_probe():
    metrics.register_probe(TOY)
    yield TOY
    del metrics.PROBES[TOY.key]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_root):
    path = str(tmp_path_factory.mktemp("probes") / "run")
    assert distill_trainer.main(["--override", *tiny_overrides(synthetic_root, path)]) == 0
    return path


def table_rows(markdown: str, first_title: str):
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_title} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    body = []
    for line in lines[start + 2:]:
        if line.startswith(f"| {first_title} |"):
            break
        body.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return header, body


def test_toy_probe_shows_in_results_markdown_and_report(run_dir, toy_probe, capsys):
    entries = ev.evaluate_run(ev.options(run_dir, device="cpu"))
    out = capsys.readouterr().out
    saved = json.load(open(os.path.join(run_dir, "eval_results.json")))
    assert saved["header"]["probes"]["centroid_acc"] == TOY.note
    for e, stored in zip(entries, saved["entries"]):
        assert 0 <= stored["centroid_acc"] <= 100 and stored["centroid_classes"] == 4
        assert stored["centroid_acc"] == e["centroid_acc"]
        assert out.count(f"{e['name']}: linear ") == 1
        assert f"centroid {e['centroid_acc']:.2f}%" in out
    markdown = open(os.path.join(run_dir, "eval_results.md")).read()
    assert TOY.note in markdown
    header, rows = table_rows(markdown, "name")
    # After the built-in probes:
    assert header.index("centroid %") == header.index("10% train linear %") + 1
    assert [float(r["centroid %"]) for r in rows] == [round(e["centroid_acc"], 2) for e in entries]

    results = [{"arm": "kd", "seed": 0, "entries": entries}]
    summary = run_experiments.summarize(run_experiments.rows_from(results))
    final = next(s for s in summary if s["arm"] == "kd" and s["epoch"] == 2)
    assert final["centroid_acc"]["values"] == [entries[1]["centroid_acc"]]
    text = report.markdown_table(summary, run_experiments.summary_table(), missing="–")
    header, rows = table_rows(text, "arm")
    assert "centroid %" in header
    kd = next(r for r in rows if r["arm"] == "kd" and r["epoch"] == "2")
    assert kd["centroid %"] == run_experiments.cell(final["centroid_acc"])
    every = report.markdown_table(run_experiments.rows_from(results), run_experiments.row_table())
    assert "centroid %" in table_rows(every, "arm")[0] and TOY.note in report.probe_note()


def test_without_the_toy_probe_nothing_of_it_remains(run_dir):
    assert TOY.key not in metrics.PROBES
    assert "centroid" not in report.probe_note()
    assert all("centroid" not in title for title, _, _ in run_experiments.summary_table())


def test_results_written_before_the_low_shot_probes_still_load():
    """An entry of an older eval_results.json (no low-shot keys, no weights key) goes through the
    report: '–'."""
    old = {"name": "epoch_2", "kind": "checkpoint", "epoch": 2, "path": "x.pth", "linear_acc": 70.0,
           "linear_reg": {"param": "weight_decay", "chosen": 1e-4, "val_acc": {}},
           "linear_acc_cls_patch": 71.0, "linear_probe_C": None, "linear_acc_fixed_C": None,
           "knn_acc": 65.0, "num_test": 10000,
           "diagnostics": {"pairwise_cos": 0.5, "feature_std": 0.01, "effective_rank": 50.0,
                           "collapsed": False, "collapsed_legacy_cos": False,
                           "student_teacher_cos": 0.9, "cka_teacher": 0.8},
           "seconds": 1.0}
    rows = run_experiments.rows_from([{"arm": "kd", "seed": 0, "entries": [old]}])
    assert rows[0]["linear_acc_1pct"] is None and rows[0]["fixed_C_acc"] is None
    assert rows[0]["knn_acc"] == 65.0
    summary = run_experiments.summarize(rows)
    assert summary[0]["linear_acc_10pct"] is None and summary[0]["linear_acc"]["mean"] == 70.0
    text = report.markdown_table(summary, run_experiments.summary_table(), "–")
    header, table = table_rows(text, "arm")
    assert table[0]["1% train linear %"] == "–" and table[0]["linear %"].startswith("70.00 [")
    assert ev.weights_label(old) is None
    assert "epoch_2: linear 70.00% (wd 0.0001)" in ev.summary_line(old)
