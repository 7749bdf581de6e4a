"""evaluate_checkpoints.py plumbing on real tiny trainer checkpoints (CPU): formats, failures,
outputs.

The probe's own behaviour (narrow-cone features) is tested in test_metrics.py; here: which files are
read, what a user sees when something is wrong, and that the JSON, markdown and PNG say the same
thing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

import distill_trainer
import evaluate_checkpoints as ev
from helpers import REPO, TINY_VIT, tiny_config, tiny_overrides
from distributed import DistInfo


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_root):
    """A real 2-epoch distillation run: checkpoint_epoch_1.pth, checkpoint_epoch_2.pth,
    log.jsonl."""
    path = str(tmp_path_factory.mktemp("evalrun") / "run")
    assert distill_trainer.main(["--override", *tiny_overrides(synthetic_root, path)]) == 0
    return path


def evaluate(capsys, *args):
    code = ev.main([*map(str, args)])
    out, err = capsys.readouterr()
    # Python warnings (the random tiny teacher announces itself) are not the evaluator's lines.
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line
             and "RANDOMLY INITIALISED" not in line and not line.startswith("  ")]
    return code, out, lines


def copy_run(run_dir, dest, epochs=(1, 2)):
    os.makedirs(dest, exist_ok=True)
    for e in epochs:
        shutil.copy(os.path.join(run_dir, f"checkpoint_epoch_{e}.pth"), dest)
    return str(dest)


def write_yaml(path, values):
    with open(path, "w") as f:
        yaml.safe_dump(values, f)
    return str(path)


def tiny_config_files(tmp_path, run_dir, **model_changes):
    """Model and data YAMLs equal to the sections stored in the run's checkpoints (plus changes)."""
    stored = torch.load(os.path.join(run_dir, "checkpoint_epoch_2.pth"), weights_only=True)[
        "config"
    ]
    model = write_yaml(tmp_path / "model.yaml", {**stored["model"], **model_changes})
    return model, write_yaml(tmp_path / "data.yaml", stored["data"])


def parse_markdown_table(path):
    rows = [line for line in open(path).read().splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    header = split[0]
    return [dict(zip(header, cells)) for cells in split[2:]]


def as_number(cell):
    return None if cell == "n/a" else float(cell)


def test_outputs_agree_json_markdown_png(tmp_path, run_dir, capsys):
    out_file = tmp_path / "res" / "results.json"
    code, out, err = evaluate(
        capsys, "--checkpoint_dir", run_dir, "--epochs", 1, 2, "--device", "cpu", "--eval_teacher",
        "--eval_untrained", "--linear_probe_C", 1.0, "--output_file", out_file,
    )
    assert code == 0 and err == [], err
    results = json.load(open(out_file))
    entries = results["entries"]
    assert [e["name"] for e in entries] == [
        "epoch_1", "epoch_2", "teacher", "teacher_direct", "untrained",
    ]
    assert [e["epoch"] for e in entries] == [1, 2, None, None, None]
    header = results["header"]
    assert (
        header["torch"] == str(torch.__version__) and header["timm"] and header["device"] == "cpu"
    )
    for e in entries:
        assert 0 <= e["linear_acc"] <= 100 and 0 <= e["knn_acc"] <= 100 and e["seconds"] > 0
        assert e["linear_reg"]["chosen"] > 0 and e["linear_acc_fixed_C"] is not None
        assert 0 <= e["linear_acc_cls_patch"] <= 100 and e["num_test"] == 32
        assert {"pairwise_cos", "feature_std", "effective_rank", "collapsed",
                "collapsed_legacy_cos"} <= set(e["diagnostics"])
        assert out.count(f"{e['name']}: linear ") == 1  # one summary line per entry
    for e in entries[:2]:  # distilled checkpoints: projection and teacher available
        assert (
            e["diagnostics"]["student_teacher_cos"] is not None
            and e["diagnostics"]["cka_teacher"] is not None
        )
    assert entries[2]["feature"] == "teacher CLS (32 -> 24 -> 32 px)"
    assert entries[3]["feature"] == "teacher CLS (32 -> 32 px)" and entries[3]["kind"] == "teacher"
    assert entries[4]["diagnostics"]["student_teacher_cos"] is None

    table = parse_markdown_table(tmp_path / "res" / "results.md")
    assert [row["name"] for row in table] == [e["name"] for e in entries]
    for row, e in zip(table, entries):
        assert as_number(row["epoch"]) == e["epoch"]
        # The table has 2 decimals; 0.0051 admits half-way cases such as 9.375 -> 9.38.
        assert as_number(row["linear %"]) == pytest.approx(e["linear_acc"], abs=0.0051)
        fixed_C = e["linear_acc_fixed_C"]
        assert as_number(row["fixed-C probe %"]) == pytest.approx(fixed_C, abs=0.0051)
        assert as_number(row["CLS+patch %"]) == pytest.approx(e["linear_acc_cls_patch"], abs=0.0051)
        assert as_number(row["kNN %"]) == pytest.approx(e["knn_acc"], abs=0.0051)
        assert as_number(row["wd"]) == pytest.approx(e["linear_reg"]["chosen"])
        assert as_number(row["pairwise cos"]) == pytest.approx(
            e["diagnostics"]["pairwise_cos"], abs=5e-4
        )
    assert open(tmp_path / "res" / "results.md").read() in out  # the printed table is the saved one

    with Image.open(tmp_path / "res" / "results.png") as png:
        assert png.format == "PNG" and png.size[0] > 200 and png.size[1] > 200
        png.verify()
    assert sorted(os.listdir(tmp_path / "res")) == ["results.json", "results.md", "results.png",
                                                    "results_predictions.npz"]  # no temp files


def test_plot_says_what_the_lines_are(tmp_path, run_dir, capsys):
    """The figure marks the random teacher, the chance level and collapsed checkpoints, names the
    loss, and its title names the data folder without its absolute path (issue 13, item 15)."""
    from config import config_from_dict
    out_file = tmp_path / "results.json"
    code, _, _ = evaluate(
        capsys, "--checkpoint_dir", run_dir, "--device", "cpu", "--eval_teacher", "--output_file",
        out_file,
    )
    assert code == 0
    entries = json.load(open(out_file))["entries"]
    teacher = next(e for e in entries if e["kind"] == "teacher")
    assert teacher["random_init"] is True and entries[0]["num_classes"] == 4
    cfg = config_from_dict(
        torch.load(os.path.join(run_dir, "checkpoint_epoch_2.pth"), weights_only=True)["config"],
        "stored",
    )
    top, bottom = ev.plot(entries, run_dir, cfg).axes
    lines = {line.get_label(): line for line in top.get_lines()}
    assert "teacher (random init) linear probe" in lines and "teacher linear probe" not in lines
    assert list(lines["chance (25 %)"].get_ydata()) == [25.0, 25.0]
    collapsed = [(e["epoch"], e["linear_acc"]) for e in entries if e["kind"] == "checkpoint"
                 and e["diagnostics"]["collapsed"]]
    marked = lines.get("collapsed (centered eff. rank < 1.5)")
    assert (marked is None and not collapsed) or [
        tuple(p) for p in marked.get_xydata()
    ] == collapsed
    assert (
        top.get_title() == f"run: imagefolder {os.path.basename(cfg.data.dataset_root)}, 4 classes"
    )
    assert (
        bottom.get_title()
        == "training loss: 1·(1−cos) CLS + 0.5·(1−cos) patch tokens, vs the teacher"
    )


def test_text_file_as_checkpoint_one_line_others_evaluated(tmp_path, run_dir, capsys):
    """torch.load raises KeyError on a text file: that checkpoint is one line, the good one is still
    reported (issue 13, item 5)."""
    work = copy_run(run_dir, tmp_path / "run")
    bad = os.path.join(work, "checkpoint_epoch_1.pth")
    with open(bad, "w") as f:
        f.write("hello\n")
    code, _, err = evaluate(capsys, "--checkpoint_dir", work, "--device", "cpu")
    assert code == 0 and err == [
        f"warning: skipped: checkpoint {bad} is not a checkpoint: it holds text ('hello'); "
        "point to a checkpoint_*.pth file written by distill_trainer.py"
    ], err
    assert [
        e["epoch"] for e in json.load(open(os.path.join(work, "eval_results.json")))["entries"]
    ] == [2]


def test_cls_patch_feature_fp32_student_and_both_teacher_paths(
    tmp_path, synthetic_root, monkeypatch
):
    """Student features are fp32 even where autocast would be bf16; the CLS + patch feature is [CLS,
    mean patch]; the teacher is read through the training path (32 -> 24 -> 32 px) and directly (32
    -> 32 px)."""
    from models import student_tokens
    from transforms import identity_params, model_inputs
    cfg = tiny_config(
        synthetic_root, str(tmp_path / "r"), **{"model.teacher_name": "vit_small_patch16_224"}
    )
    # as on an A100/H100
    monkeypatch.setattr(ev, "autocast_dtype", lambda precision, device: torch.bfloat16)
    opts = ev.options(str(tmp_path), device="cpu", batch_size=16, eval_teacher=True)
    data = ev.load_data(cfg.data, opts.device)
    student = ev.untrained_student(cfg)
    feats = ev.student_features(student, cfg, data, opts)
    with torch.no_grad():
        x, _ = model_inputs(data.test_images, identity_params(len(data.test_images)), 24)
        cls, patches = student_tokens(student, x)
    torch.testing.assert_close(
        feats.test_cls_patch, torch.cat([cls, patches.mean(1)], 1), rtol=1e-5, atol=1e-5
    )
    # fp32: bf16 would be off by ~1e-2
    torch.testing.assert_close(feats.test, cls, rtol=1e-5, atol=1e-5)
    assert feats.train_cls_patch.shape == (len(data.train_images), 2 * TINY_VIT["embed_dim"])

    shared = ev.Shared(opts)
    via_student, direct = (shared.teacher(cfg, data, direct=d) for d in (False, True))
    teacher = ev.load_teacher(cfg, opts)  # the same seeded random teacher
    with torch.no_grad():
        expected = {}
        for name, (size, teacher_size) in {"path": (24, 32), "direct": (32, None)}.items():
            s, t = model_inputs(
                data.test_images, identity_params(len(data.test_images)), size, teacher_size
            )
            expected[name] = teacher(t if teacher_size else s)
    for got, (cls_t, patches_t) in ((via_student, expected["path"]), (direct, expected["direct"])):
        # the teacher ran under (CPU) bf16 autocast: equal to the fp32 forward up to bf16 rounding
        torch.testing.assert_close(got.test, cls_t, rtol=0.05, atol=0.05)
        torch.testing.assert_close(got.test_cls_patch[:, :32], got.test)
        torch.testing.assert_close(
            got.test_cls_patch[:, 32:], patches_t.mean(1), rtol=0.05, atol=0.05
        )
    # two different views of the image
    assert not torch.allclose(via_student.test, direct.test, atol=1e-3)


def test_untrained_baseline_is_the_trainers_init(tmp_path, synthetic_root):
    cfg = tiny_config(synthetic_root, str(tmp_path / "r"), **{"train.seed": 3})
    student = distill_trainer.build_run(cfg, DistInfo(), torch.device("cpu")).trainable.student
    untrained = ev.untrained_student(cfg)
    for key, value in student.state_dict().items():
        assert torch.equal(value, untrained.state_dict()[key]), key


def test_legacy_format_checkpoint_uses_model_config(tmp_path, run_dir, capsys):
    """An old checkpoint: `_orig_mod.` keys, no config; same weights must give the same numbers."""
    ckpt = torch.load(os.path.join(run_dir, "checkpoint_epoch_2.pth"), weights_only=True)
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    torch.save({"student": {f"_orig_mod.{k}": v for k, v in ckpt["student"].items()}, "epoch": 2},
               legacy_dir / "checkpoint_epoch_2.pth")
    model_yaml, data_yaml = tiny_config_files(tmp_path, run_dir)
    common = ["--epochs", 2, "--device", "cpu", "--data_config", data_yaml]
    code, _, err = evaluate(
        capsys, "--checkpoint_dir", legacy_dir, "--model_config", model_yaml, *common
    )
    assert code == 0 and err == [], err
    code, _, _ = evaluate(
        capsys, "--checkpoint_dir", run_dir, *common, "--output_file", tmp_path / "ref.json"
    )
    assert code == 0
    legacy = json.load(open(legacy_dir / "eval_results.json"))["entries"][0]
    ref = json.load(open(tmp_path / "ref.json"))["entries"][0]
    assert legacy["linear_acc"] == ref["linear_acc"] and legacy["knn_acc"] == ref["knn_acc"]
    assert legacy["diagnostics"]["pairwise_cos"] == pytest.approx(
        ref["diagnostics"]["pairwise_cos"], abs=1e-6
    )
    # a legacy file carries no projection
    assert legacy["diagnostics"]["student_teacher_cos"] is None


def test_wrong_architecture_is_one_line_naming_file_and_key(tmp_path, run_dir, capsys):
    ckpt = torch.load(os.path.join(run_dir, "checkpoint_epoch_1.pth"), weights_only=True)
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    torch.save({"student": {f"module.{k}": v for k, v in ckpt["student"].items()}},
               legacy_dir / "checkpoint_epoch_1.pth")
    model_yaml, _ = tiny_config_files(
        tmp_path, run_dir, student_kwargs={**TINY_VIT, "embed_dim": 48}
    )
    code, _, err = evaluate(
        capsys, "--checkpoint_dir", legacy_dir, "--model_config", model_yaml, "--device", "cpu"
    )
    assert code == 2 and len(err) == 1, err  # the only checkpoint could not be evaluated: one line
    assert "checkpoint_epoch_1.pth" in err[0] and "first mismatching key 'cls_token'" in err[0], err


def test_missing_epochs_one_line_rest_evaluated(tmp_path, run_dir, capsys):
    out_file = tmp_path / "r.json"
    code, _, err = evaluate(
        capsys, "--checkpoint_dir", run_dir, "--epochs", 1, 9, 30, "--device", "cpu",
        "--output_file", out_file,
    )
    assert code == 0 and len(err) == 1 and "9, 30" in err[0] and "missing" in err[0], err
    assert [e["epoch"] for e in json.load(open(out_file))["entries"]] == [1]


@pytest.mark.parametrize("keep", ["half", "4kB"])  # the zip reader fails differently on the two
def test_truncated_file_one_line_others_evaluated(tmp_path, run_dir, capsys, keep):
    work = copy_run(run_dir, tmp_path / "run")
    bad = os.path.join(work, "checkpoint_epoch_1.pth")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2 if keep == "half" else 4096])
    code, _, err = evaluate(capsys, "--checkpoint_dir", work, "--device", "cpu")  # all epochs found
    assert code == 0 and len(err) == 1 and bad in err[0] and "truncated or corrupt" in err[0], err
    assert [
        e["epoch"] for e in json.load(open(os.path.join(work, "eval_results.json")))["entries"]
    ] == [2]
    os.remove(os.path.join(work, "checkpoint_epoch_2.pth"))
    code, _, err = evaluate(capsys, "--checkpoint_dir", work, "--device", "cpu")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: no requested checkpoint"), err
    assert bad in err[0] and "truncated or corrupt" in err[0], err


@pytest.mark.parametrize("args,needle", [
    (["--epochs", "7", "8"], "no checkpoint_epoch_{N}.pth for epochs 7, 8"),
    (["--epochs", "-1", "2"], "cannot be negative"),
    (["--data_config", "DATA_TYPO"], "unknown key 'data.datset_name'"),
])
def test_bad_input_exit_2_one_line(tmp_path, run_dir, capsys, args, needle):
    typo = write_yaml(tmp_path / "typo.yaml", {"datset_name": "cifar10"})
    args = [typo if a == "DATA_TYPO" else a for a in args]
    code, _, err = evaluate(capsys, "--checkpoint_dir", run_dir, "--device", "cpu", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_dataset_flag_conflict_warns_and_wins(run_dir, capsys):
    """The legacy command line says --dataset cifar10; on an image-folder run that is one warning,
    then the flag."""
    code, _, err = evaluate(capsys, "--checkpoint_dir", run_dir, "--epochs", 1, "--device", "cpu",
                            "--dataset", "cifar10")
    assert code == 2 and len(err) == 2, err
    assert err[0] == (f"warning: --dataset cifar10 overrides data.dataset_name=imagefolder from "
                      f"{os.path.join(run_dir, 'checkpoint_epoch_1.pth')}")
    assert (
        err[1].startswith("error: cifar10: dataset not found") and "cifar-10-batches-py" in err[1]
    )


@pytest.mark.slow
def test_cli_missing_dir_exit_2_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "evaluate_checkpoints.py"),
            "--checkpoint_dir",
            str(tmp_path / "nope"),
            "--epochs", "1", "--device", "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --checkpoint_dir") and "Traceback" not in result.stderr


def test_flags_are_described_once_and_options_take_the_same_names(tmp_path, capsys):
    """--help, parse_args and options() all come from ev.FLAGS: each flag, its help, its default."""
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, spec in ev.FLAGS.items():
        assert f"--{name}" in text and " ".join(spec["help"].split()) in text, name
    from_cli = ev.parse_args(["--checkpoint_dir", str(tmp_path), "--device", "cpu"])
    in_process = ev.options(str(tmp_path), device="cpu")
    assert from_cli == in_process and in_process.batch_size == ev.FLAGS["batch_size"]["default"]
    with pytest.raises(TypeError, match="unknown flags \\['batchsize'\\]"):
        ev.options(str(tmp_path), batchsize=8)
