"""run_experiments.py end to end on tiny settings: two arms, a teacher taken from an arm, a legacy re-probe."""
from __future__ import annotations

import json
import os
import shlex

import pytest
import torch
import yaml

import distill_trainer
import run_experiments
from config import load_config
from helpers import REPO, TINY_VIT, tiny_overrides

pytestmark = pytest.mark.slow  # each test reads a two-arm experiment trained end to end


def tiny_model_config(tmp_path) -> str:
    """A model config file with the tiny architecture, so legacy-format (config-less) checkpoints can be probed."""
    with open(os.path.join(REPO, "model_config_kd.yaml")) as f:
        values = yaml.safe_load(f)
    values.update(teacher_name="vit_small_patch16_224", teacher_pretrained=False, teacher_img_size=32,
                  teacher_kwargs=TINY_VIT, student_img_size=24, student_kwargs=TINY_VIT)
    path = tmp_path / "model_tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def parse_table(markdown: str):
    lines = [line for line in markdown.splitlines()
             if line.startswith("| ") and not line.startswith(("| arm", "| ---"))]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append({"arm": cells[0], "epoch": None if cells[1] == "–" else int(cells[1]),
                     "linear_acc": float(cells[2]), "knn_acc": float(cells[3]),
                     "fixed_C_acc": None if cells[4] == "–" else float(cells[4])})
    return rows


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("exp")
    out_dir = str(tmp / "experiments")
    overrides = [o for o in tiny_overrides(synthetic_root, "unused") if not o.startswith(("train.checkpoint_dir",
                                                                                         "model."))]
    argv = ["--arms", "kd", "supervised", "--teacher_from_arm", "supervised", "--epochs", "1", "2",
            "--out_dir", out_dir, "--model_config", tiny_model_config(tmp), "--override", *overrides]
    assert run_experiments.main(argv) == 0
    return out_dir, argv


def test_report_table_matches_evaluator_json(experiment):
    out_dir, _ = experiment
    table = parse_table(open(os.path.join(out_dir, "report.md")).read())
    expected = []
    for arm in ("supervised", "kd"):  # the teacher arm is trained (and listed) first
        with open(os.path.join(out_dir, arm, "eval_results.json")) as f:
            entries = json.load(f)["entries"]
        expected += [(arm if e["kind"] not in ("teacher", "untrained") else e["name"], e["epoch"], e["linear_acc"],
                      e["knn_acc"]) for e in entries]
    got = [(r["arm"], r["epoch"], r["linear_acc"], r["knn_acc"]) for r in table]
    assert sorted(got, key=str) == sorted([(a, ep, round(l, 2), round(k, 2)) for a, ep, l, k in expected], key=str)
    assert {r["arm"] for r in table} == {"supervised", "kd", "teacher", "untrained"}
    assert os.path.getsize(os.path.join(out_dir, "report.png")) > 1000


def test_kd_arm_used_the_supervised_teacher_and_verdict_is_computed(experiment):
    out_dir, _ = experiment
    kd = torch.load(os.path.join(out_dir, "kd", "checkpoint_epoch_2.pth"), weights_only=True)
    assert kd["config"]["model"]["teacher_weights"].endswith(os.path.join("supervised", "checkpoint_epoch_2.pth"))
    assert kd["config"]["model"]["teacher_img_size"] == 24
    report = json.load(open(os.path.join(out_dir, "report.json")))
    untrained = next(r for r in report["rows"] if r["arm"] == "untrained")
    kd_final = [r for r in report["rows"] if r["arm"] == "kd" and r["epoch"] == 2][0]
    line = next(v for v in report["verdict"] if v.startswith("**kd**"))
    assert f"{kd_final['linear_acc'] - untrained['linear_acc']:+.1f} points" in line
    assert any(v.startswith("Answer:") for v in report["verdict"])


def test_rerun_skips_finished_arms_and_reprobes_legacy(experiment, capsys, tmp_path):
    out_dir, argv = experiment
    # A legacy-format checkpoint: prefixed keys, no config.
    kd = torch.load(os.path.join(out_dir, "kd", "checkpoint_epoch_2.pth"), weights_only=True)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"student": {f"_orig_mod.{k}": v for k, v in kd["student"].items()}, "epoch": 2},
               legacy / "checkpoint_epoch_2.pth")
    data_cfg = tmp_path / "data.yaml"
    data = yaml.safe_load(open(os.path.join(REPO, "data_config.yaml")))
    data.update(dataset_name="imagefolder", dataset_root=kd["config"]["data"]["dataset_root"], image_size=24,
                num_workers=0, download=False)
    data_cfg.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert run_experiments.main(argv + ["--legacy_dir", str(legacy), "--legacy_data_config", str(data_cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count("final checkpoint exists: skipping training") == 2
    legacy_rows = [r for r in parse_table(open(os.path.join(out_dir, "report.md")).read()) if r["arm"] == "legacy"]
    assert len(legacy_rows) == 1 and legacy_rows[0]["fixed_C_acc"] is not None
    verdict = json.load(open(os.path.join(out_dir, "report.json")))["verdict"]
    assert any(v.startswith("Earlier checkpoints:") for v in verdict)


def test_config_layers_and_printed_trainer_arguments(tmp_path, synthetic_root):
    """Files < arm file < --override < the runner's own keys; the --dry_run line gives the very Config trained."""
    overrides = [o for o in tiny_overrides(synthetic_root, "unused") if not o.startswith(("train.checkpoint_dir",
                                                                                         "model."))]
    args = run_experiments.parse_args(["--arms", "kd_cls_only", "supervised", "--epochs", "1", "--out_dir",
                                       str(tmp_path), "--model_config", tiny_model_config(tmp_path), "--override",
                                       *overrides, "train.distill_loss_weights={cls: 1.0, patch: 0.25}"])
    plans = {plan["arm"]: plan for plan in run_experiments.plan_arms(args)}
    assert plans["kd_cls_only"]["cfg"].train.distill_loss_weights == {"cls": 1.0, "patch": 0.25}
    assert plans["supervised"]["cfg"].train.objective == "supervised"
    for arm, plan in plans.items():
        cfg = plan["cfg"]
        assert cfg.train.save_epochs == [1, 2] and cfg.train.checkpoint_dir == os.path.join(str(tmp_path), arm)
        printed = distill_trainer.parse_args(shlex.split(run_experiments.trainer_arguments(cfg, args)))
        assert load_config(printed.data_config, printed.train_config, printed.model_config, printed.override) == cfg


def test_unknown_arm_is_one_line(capsys):
    assert run_experiments.main(["--arms", "kd_typo", "--dry_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --arms: unknown arm 'kd_typo'") and "\n" not in err
