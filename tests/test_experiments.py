"""run_experiments.py end to end on tiny settings: two arms, a teacher taken from an arm, a legacy
re-probe; seeds with per-seed teachers and the transfer arm trained on a synthetic 96 px folder."""
from __future__ import annotations

import json
import os
import shlex

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import distill_trainer
import run_experiments
import stats
from config import load_config
from helpers import CLASSES, REPO, TINY_VIT, class_image, tiny_overrides

# Each test reads an experiment trained end to end; tiny tensors run faster on one thread than on
# two busy cores.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def tiny_model_config(tmp_path) -> str:
    """A model config file with the tiny architecture, so legacy-format (config-less) checkpoints
    can be probed."""
    with open(os.path.join(REPO, "model_config_kd.yaml")) as f:
        values = yaml.safe_load(f)
    values.update(
        teacher_name="vit_small_patch16_224",
        teacher_pretrained=False,
        teacher_img_size=32,
        teacher_kwargs=TINY_VIT,
        student_img_size=24,
        student_kwargs=TINY_VIT,
    )
    path = tmp_path / "model_tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def parse_table(markdown: str):
    """The 'Every run' table of report.md: one row per evaluated entry."""
    lines = markdown.split("## Every run", 1)[1].splitlines()
    lines = [
        line for line in lines if line.startswith("| ") and not line.startswith(("| arm", "| ---"))
    ]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append({
            "arm": cells[0],
            "seed": None if cells[1] == "–" else int(cells[1]),
            "epoch": None if cells[2] == "–" else int(cells[2]),
            "linear_acc": float(cells[3]),
            "cls_patch_acc": float(cells[4]),
            "fixed_C_acc": None if cells[5] == "–" else float(cells[5]),
            "knn_acc": float(cells[6]),
        })
    return rows


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("exp")
    out_dir = str(tmp / "experiments")
    overrides = [
        o
        for o in tiny_overrides(synthetic_root, "unused")
        if not o.startswith(("train.checkpoint_dir", "model."))
    ]
    argv = [
        "--arms", "kd", "supervised", "--teacher_from_arm", "supervised", "--epochs", "1", "2",
        "--out_dir", out_dir, "--model_config",
        tiny_model_config(tmp),
        "--override",
        *overrides,
    ]
    assert run_experiments.main(argv) == 0
    return out_dir, argv


def test_report_table_matches_evaluator_json(experiment):
    out_dir, _ = experiment
    table = parse_table(open(os.path.join(out_dir, "report.md")).read())
    expected = []
    for arm in ("supervised", "kd"):  # the teacher arm is trained (and listed) first
        with open(os.path.join(out_dir, arm, "eval_results.json")) as f:
            entries = json.load(f)["entries"]
        # teacher rows are named by the teacher: the supervised arm's student at its 24 px
        expected += [
            (
                {"teacher": f"{e['name']}@24", "untrained": "untrained"}.get(e["kind"], arm),
                e["epoch"],
                e["linear_acc"],
                e["knn_acc"],
            )
            for e in entries
        ]
    got = [(r["arm"], r["epoch"], r["linear_acc"], r["knn_acc"]) for r in table]
    assert sorted(got, key=str) == sorted(
        [(a, ep, round(l, 2), round(k, 2)) for a, ep, l, k in expected], key=str
    )
    assert {r["arm"] for r in table} == {
        "supervised", "kd", "teacher@24", "teacher_direct@24", "untrained",
    }
    predictions = np.load(os.path.join(out_dir, "kd", "eval_predictions.npz"))
    assert predictions["epoch_2/linear_acc"].dtype == np.int16
    # the fixed-C probe runs for every arm and baseline
    assert all(r["fixed_C_acc"] is not None for r in table)
    assert os.path.getsize(os.path.join(out_dir, "report.png")) > 1000


def test_kd_arm_used_the_supervised_teacher_and_verdict_is_computed(experiment):
    out_dir, _ = experiment
    kd = torch.load(os.path.join(out_dir, "kd", "checkpoint_epoch_2.pth"), weights_only=True)
    assert kd["config"]["model"]["teacher_weights"].endswith(
        os.path.join("supervised", "checkpoint_epoch_2.pth")
    )
    assert kd["config"]["model"]["teacher_img_size"] == 24
    report = json.load(open(os.path.join(out_dir, "report.json")))
    untrained = next(r for r in report["rows"] if r["arm"] == "untrained")
    kd_final = [r for r in report["rows"] if r["arm"] == "kd" and r["epoch"] == 2][0]
    line = next(v for v in report["verdict"] if v.startswith("**kd**"))
    assert f"- untrained {kd_final['linear_acc'] - untrained['linear_acc']:+.1f} [" in line
    assert any(f"points: {word}" in line for word in stats.VERDICTS)
    assert "% of teacher@24's" in line  # its own teacher: the supervised arm's student
    assert sum(v.startswith("Answer:") for v in report["verdict"]) == 1
    assert any(v.startswith("Power gate") for v in report["verdict"])


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
    data.update(
        dataset_name="imagefolder",
        dataset_root=kd["config"]["data"]["dataset_root"],
        image_size=24,
        num_workers=0,
        download=False,
    )
    data_cfg.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert (
        run_experiments.main(
            argv + ["--legacy_dir", str(legacy), "--legacy_data_config", str(data_cfg)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("final checkpoint exists: skipping training") == 2
    markdown = open(os.path.join(out_dir, "report.md")).read()
    legacy_rows = [r for r in parse_table(markdown) if r["arm"] == "legacy"]
    assert len(legacy_rows) == 1 and legacy_rows[0]["fixed_C_acc"] is not None
    verdict = json.load(open(os.path.join(out_dir, "report.json")))["verdict"]
    assert any(v.startswith("Legacy check:") for v in verdict)
    # the 2x2 names the cells it could not fill
    assert (
        "## Pipeline x training data" in markdown
        and "missing (pass --legacy_cifar_dir)" in markdown
    )
    assert any(
        v.startswith("Without --transfer_root") and "J above is kd - legacy" in v for v in verdict
    )
    assert any(v.startswith("J (data and pipeline together: kd - legacy)") for v in verdict)


def test_config_layers_and_printed_trainer_arguments(tmp_path, synthetic_root):
    """Files < arm file < --override < the runner's own keys; the --dry_run line gives the very
    Config trained."""
    overrides = [
        o
        for o in tiny_overrides(synthetic_root, "unused")
        if not o.startswith(("train.checkpoint_dir", "model."))
    ]
    args = run_experiments.parse_args([
        "--arms", "kd_cls_only", "supervised", "--epochs", "1", "--out_dir",
        str(tmp_path),
        "--model_config",
        tiny_model_config(tmp_path),
        "--override",
        *overrides,
        "train.distill_loss_weights={cls: 1.0, patch: 0.25}",
    ])
    plans = {plan["arm"]: plan for plan in run_experiments.plan_arms(args)}
    assert plans["kd_cls_only"]["cfg"].train.distill_loss_weights == {"cls": 1.0, "patch": 0.25}
    assert plans["supervised"]["cfg"].train.objective == "supervised"
    for arm, plan in plans.items():
        cfg = plan["cfg"]
        assert cfg.train.save_epochs == [1, 2] and cfg.train.checkpoint_dir == os.path.join(
            str(tmp_path), arm
        )
        printed = distill_trainer.parse_args(
            shlex.split(run_experiments.trainer_arguments(cfg, args))
        )
        assert (
            load_config(
                printed.data_config, printed.train_config, printed.model_config, printed.override
            )
            == cfg
        )


@pytest.mark.parametrize(
    "argv,start",
    [
        (["--arms", "kd_typo"], "error: --arms: unknown arm 'kd_typo'"),
        (
            ["--arms", "kd_transfer"],
            "error: --arms kd_transfer trains on another dataset: pass --transfer_root",
        ),
        (["--arms", "kd", "--seeds", "1", "1"], "error: argument --seeds: expected distinct seeds"),
    ],
)
def test_runner_mistakes_are_one_line(capsys, argv, start):
    try:
        code = run_experiments.main(argv + ["--dry_run"])
    except SystemExit as e:  # flag mistakes end in argparse, as for every entry point
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(start) and "\n" not in err, err


# ------------------------------------------------------------------------------- seeds and transfer
def make_transfer_folder(root, n=40) -> str:
    """An unlabelled 96 px image folder: nested sub-folders, PNG and JPEG, the synthetic classes'
    patterns."""
    rng = np.random.default_rng(5)
    for i in range(n):
        folder = os.path.join(root, f"part{i % 3}", *(["deeper"] if i % 2 else []))
        os.makedirs(folder, exist_ok=True)
        image = Image.fromarray(class_image(i % len(CLASSES), rng, size=96))
        image.save(os.path.join(folder, f"{i:03d}.{'png' if i % 4 else 'jpg'}"))
    return str(root)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("seeded")
    out_dir, transfer = str(tmp / "experiments"), make_transfer_folder(tmp / "transfer96")
    overrides = [
        o
        for o in tiny_overrides(synthetic_root, "unused")
        if not o.startswith(("train.checkpoint_dir", "model."))
    ]
    argv = [
        "--arms", "kd", "supervised", "--teacher_from_arm", "supervised", "--seeds", "0", "1",
        "--epochs", "1", "2", "--transfer_root", transfer, "--out_dir", out_dir, "--model_config",
        tiny_model_config(tmp),
        "--override",
        *overrides,
    ]
    assert run_experiments.main(argv) == 0
    return out_dir, transfer


def test_seeds_train_every_arm_per_seed_with_that_seeds_teacher(seeded):
    out_dir, _ = seeded
    for arm in ("supervised", "kd", "kd_transfer"):
        for seed in (0, 1):
            ckpt = torch.load(
                os.path.join(out_dir, arm, f"seed{seed}", "checkpoint_epoch_2.pth"),
                weights_only=True,
            )
            assert ckpt["config"]["train"]["seed"] == seed
            # each seed's KD arms learn from the same seed's supervised student
            if arm != "supervised":
                assert ckpt["config"]["model"]["teacher_weights"] == os.path.join(
                    out_dir, "supervised", f"seed{seed}", "checkpoint_epoch_2.pth")
    seed0 = torch.load(
        os.path.join(out_dir, "kd", "seed0", "checkpoint_epoch_2.pth"), weights_only=True
    )["student"]
    seed1 = torch.load(
        os.path.join(out_dir, "kd", "seed1", "checkpoint_epoch_2.pth"), weights_only=True
    )["student"]
    assert not torch.equal(seed0["cls_token"], seed1["cls_token"])


def test_transfer_arm_trains_on_the_folder_and_is_probed_on_the_labelled_data(
    seeded, synthetic_root
):
    out_dir, transfer = seeded
    ckpt = torch.load(
        os.path.join(out_dir, "kd_transfer", "seed0", "checkpoint_epoch_2.pth"), weights_only=True
    )
    data = ckpt["config"]["data"]
    assert data["dataset_name"] == "folder" and data["dataset_root"] == os.path.abspath(transfer)
    assert ckpt["scheduler"]["num_train_images"] == 36  # 40 images, 4 held out for the diagnostics
    with open(os.path.join(out_dir, "kd_transfer", "seed0", "eval_results.json")) as f:
        entries = json.load(f)["entries"]
    assert all(e["data"].startswith(f"imagefolder {synthetic_root}") for e in entries)
    assert all(e["num_test"] == 32 and e["linear_acc_fixed_C"] is not None for e in entries)


def test_report_gives_intervals_over_seeds_and_per_seed_baselines(seeded):
    out_dir, _ = seeded
    report = json.load(open(os.path.join(out_dir, "report.json")))
    by_key = {(s["arm"], s["epoch"]): s for s in report["summary"]}
    for arm in ("supervised", "kd", "kd_transfer", "teacher@24", "teacher_direct@24", "untrained"):
        epoch = None if arm in ("teacher@24", "teacher_direct@24", "untrained") else 2
        s = by_key[(arm, epoch)]
        # the teacher differs per seed: probed per seed
        assert s["n"] == 2 and sorted(s["seeds"]) == [0, 1]
        values = [
            r["linear_acc"] for r in report["rows"] if r["arm"] == arm and r["epoch"] == epoch
        ]
        assert s["linear_acc"]["values"] == values
        assert (s["linear_acc"]["lo"], s["linear_acc"]["hi"]) == pytest.approx(
            stats.accuracy_interval(values, 32)
        )
    markdown = open(os.path.join(out_dir, "report.md")).read()
    kd = by_key[("kd", 2)]["linear_acc"]
    assert f"| kd | 2 | 2 | {kd['mean']:.2f} [{kd['lo']:.2f}, {kd['hi']:.2f}] |" in markdown
    verdict = report["verdict"]
    assert any(v.startswith("**kd_transfer**") for v in verdict)
    assert any(
        v.startswith("D (data: kd - kd_transfer) ") and "paired by seed" in v for v in verdict
    )
    assert any(v.startswith("Without --legacy_dir") for v in verdict)
    assert any(
        v.startswith("--transfer_match steps: the folder arms are step-matched") for v in verdict
    )
