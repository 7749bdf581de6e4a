"""What the evaluator and the report do with odd inputs: a checkpoint of another run in the run
directory, a checkpoint with NaN weights beside good ones, requested epochs that a reused arm never
saved, a collapse verdict and its figure."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import evaluate_checkpoints
import run_experiments
from helpers import make_imagefolder, tiny_overrides
import distill_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, synthetic_root):
    run_dir = str(tmp_path_factory.mktemp("eval_inputs") / "run")
    assert distill_trainer.main(["--override", *tiny_overrides(synthetic_root, run_dir)]) == 0
    return run_dir


def evaluate(run_dir, capsys, *flags):
    capsys.readouterr()
    code = evaluate_checkpoints.main(["--checkpoint_dir", run_dir, "--device", "cpu", *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_checkpoint_of_another_run_is_skipped_by_name(two_epochs, tmp_path, capsys):
    """Issue 17.9: a checkpoint copied in from a run on other data is not tabled as this run's."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(two_epochs, run_dir)
    other = make_imagefolder(tmp_path / "other", train_per_class=2, test_per_class=1)
    path = os.path.join(run_dir, "checkpoint_epoch_2.pth")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["data"]["dataset_root"] = other
    torch.save(ckpt, path)
    code, _, err = evaluate(run_dir, capsys)
    assert code == 0, err
    assert (f"checkpoint {path} is from another run than {run_dir}/config.yaml "
            f"(data.dataset_root") in err
    entries = json.load(open(os.path.join(run_dir, "eval_results.json")))["entries"]
    assert [e["epoch"] for e in entries] == [1]


def test_nan_checkpoint_is_skipped_and_the_other_epochs_evaluated(two_epochs, tmp_path, capsys):
    """Issue 17.18: named in one warning line; epoch 1 still probed."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(two_epochs, run_dir)
    path = os.path.join(run_dir, "checkpoint_epoch_2.pth")
    ckpt = torch.load(path, weights_only=True)
    for v in ckpt["student"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(ckpt, path)
    code, _, err = evaluate(run_dir, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert f"skipped: checkpoint {path} has non-finite (NaN/inf) weights" in err
    entries = json.load(open(os.path.join(run_dir, "eval_results.json")))["entries"]
    assert [e["epoch"] for e in entries] == [1]


def test_report_names_requested_epochs_a_reused_arm_lacks(tmp_path):
    """Issue 17.8: the reused kd arm saved only epoch 2; epochs 1 2 were asked for."""
    run_dir = tmp_path / "kd"
    run_dir.mkdir()
    (run_dir / "checkpoint_epoch_2.pth").write_bytes(b"")
    plans = [{"arm": "kd", "seed": 0, "dir": str(run_dir)},
             {"arm": "supervised", "seed": 0, "dir": str(tmp_path)}]
    rows = [{"arm": "kd", "seed": 0, "epoch": 2}, {"arm": "supervised", "seed": 0, "epoch": 1},
            {"arm": "supervised", "seed": 0, "epoch": 2}]
    (line,) = run_experiments.missing_epochs(plans, rows, [1, 2])
    assert line.startswith(f"kd seed 0 (epoch 1: no checkpoint_epoch_1.pth; {run_dir} holds "
                           f"epochs 2: a run reused")


def test_suite_checks_every_output_before_training(tmp_path, synthetic_root, capsys):
    """Issue 17.7 for run_experiments.py: report.json blocked by a directory is found before the
    first arm trains."""
    out_dir = tmp_path / "exp"
    (out_dir / "report.json").mkdir(parents=True)
    overrides = [o for o in tiny_overrides(synthetic_root, "unused")
                 if not o.startswith("train.checkpoint_dir")]
    capsys.readouterr()
    code = run_experiments.main(["--arms", "supervised", "--epochs", "1", "--out_dir", str(out_dir),
                                 "--override", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith("error: --out_dir ") and "is a directory" in err, err
    assert not (out_dir / "supervised").exists()


def test_collapse_verdict_shows_the_figure_that_decided_it():
    """Issue 17.22: a constant output plus float noise has a high effective rank; the spread
    decides, and the line says so rather than 'eff. rank 17.6 (collapsed)'."""
    import metrics
    g = torch.Generator().manual_seed(0)
    noise = torch.ones(64, 32) + 1e-7 * torch.randn(64, 32, generator=g)
    d = metrics.collapse_diagnostics(noise)
    assert d["collapsed"] and d["effective_rank"] > metrics.COLLAPSE_MIN_RANK
    assert evaluate_checkpoints.collapse_note(d).startswith(" (collapsed: spread ")
    direction = torch.randn(1, 32, generator=g)
    on_a_line = torch.ones(64, 1) * direction + 1e-2 * torch.randn(64, 1, generator=g) * direction
    line = metrics.collapse_diagnostics(on_a_line)
    assert evaluate_checkpoints.collapse_note(line) == " (collapsed: rank < 1.5)"
    spread = metrics.collapse_diagnostics(torch.randn(64, 32, generator=g))
    assert evaluate_checkpoints.collapse_note(spread) == ""


def test_legend_mentions_fixed_C_only_with_that_column(two_epochs, tmp_path, capsys):
    import report
    assert "Fixed-C" in report.probe_note() and "Fixed-C" not in report.probe_note(["linear_acc"])
    run_dir = str(tmp_path / "run")
    shutil.copytree(two_epochs, run_dir)
    code, _, err = evaluate(run_dir, capsys, "--epochs", "1")
    assert code == 0, err
    markdown = open(os.path.join(run_dir, "eval_results.md")).read()
    assert "Fixed-C" not in markdown and "fixed C" not in markdown and "| spread |" in markdown
