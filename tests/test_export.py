"""export_student.py: the exported student computes the checkpoint's features, loaded by timm alone
(in this process and in a fresh one without this repo), EMA weights when the checkpoint has them,
and one-line errors (tiny CPU runs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import distill_trainer
import export_student
from config import config_from_dict
from helpers import tiny_overrides
from models import build_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic_root):
    """checkpoint_epoch_1.pth of a real one-epoch run."""
    run_dir = str(tmp_path_factory.mktemp("export") / "run")
    extra = {"train.num_epochs": 1, "train.save_epochs": [1], "train.warmup_epochs": 0}
    overrides = tiny_overrides(synthetic_root, run_dir, **extra)
    assert distill_trainer.main(["--override", *overrides]) == 0
    return os.path.join(run_dir, "checkpoint_epoch_1.pth")


def checkpoint_student(path, key="student"):
    """The checkpoint's student (or its 'student_ema'), rebuilt from the stored config."""
    ckpt = torch.load(path, weights_only=True)
    student = build_student(config_from_dict(ckpt["config"], path).model)
    student.load_state_dict(ckpt[key])
    return student.eval()


def with_ema(checkpoint, folder):
    """The checkpoint with a 'student_ema' entry: a student state_dict unlike 'student'."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["student_ema"] = {k: v * 0.5 + 0.01 if v.is_floating_point() else v
                           for k, v in ckpt["student"].items()}
    path = os.path.join(str(folder), "checkpoint_ema.pth")
    torch.save(ckpt, path)
    return path


def batch(n=4, size=24):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def timm_load(weights_path, json_path):
    with open(json_path) as f:
        meta = json.load(f)
    model = timm.create_model(meta["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=weights_path), **meta["model_args"])
    return model.eval(), meta


def test_exported_student_has_the_checkpoints_features(tmp_path, checkpoint, capsys):
    out = str(tmp_path / "student.safetensors")
    assert export_student.main(["--checkpoint", checkpoint, "--out", out]) == 0
    assert "wrote" in capsys.readouterr().out
    model, meta = timm_load(out, str(tmp_path / "student.json"))
    assert meta["architecture"] == "vit_small_patch16_224" and meta["num_classes"] == 0
    assert meta["model_args"] == {"img_size": 24, "num_classes": 0, "embed_dim": 32, "depth": 2,
                                  "num_heads": 2, "patch_size": 8}
    assert meta["exported_from"]["weights"] == "student" and meta["exported_from"]["epoch"] == 1
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(batch()),
                                   checkpoint_student(checkpoint).forward_features(batch()),
                                   rtol=1e-6, atol=1e-6)
    from safetensors.torch import load_file
    assert set(load_file(out)) == set(checkpoint_student(checkpoint).state_dict())  # weights only


def test_ema_weights_exported_when_the_checkpoint_has_them(tmp_path, checkpoint):
    path = with_ema(checkpoint, tmp_path)
    x = batch()
    with torch.no_grad():
        ema, trained = (checkpoint_student(path, k).forward_features(x)
                        for k in ("student_ema", "student"))
        assert not torch.allclose(ema, trained, atol=1e-3)  # the two can be told apart
        for flag, key, expected in ((None, "student_ema", ema), ("student", "student", trained),
                                    ("ema", "student_ema", ema)):
            out = str(tmp_path / f"{flag}.safetensors")
            args = ["--checkpoint", path, "--out", out] + (["--weights", flag] if flag else [])
            assert export_student.main(args) == 0
            model, meta = timm_load(out, out.replace(".safetensors", ".json"))
            assert meta["exported_from"]["weights"] == key
            torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_exports_load_in_a_fresh_process_with_timm_alone(tmp_path, checkpoint):
    ema_checkpoint = with_ema(checkpoint, tmp_path)
    file_out, dir_out = str(tmp_path / "s.safetensors"), str(tmp_path / "timm_dir") + os.sep
    assert export_student.main(["--checkpoint", ema_checkpoint, "--out", file_out]) == 0
    assert export_student.main(["--checkpoint", checkpoint, "--out", dir_out]) == 0
    torch.save(batch(), tmp_path / "x.pt")
    # No repo module can be imported there: the cwd is tmp_path and PYTHONPATH is unset.
    script = f"""
import importlib.util, json, sys, timm, torch
assert importlib.util.find_spec("export_student") is None and "config" not in sys.modules
meta = json.load(open({str(tmp_path / "s.json")!r}))
model = timm.create_model(meta["architecture"], pretrained=True,
                          pretrained_cfg_overlay=dict(file={file_out!r}), **meta["model_args"])
folder_model = timm.create_model("local-dir:" + {dir_out!r}, pretrained=True)
x = torch.load("x.pt")
with torch.no_grad():
    outputs = [model.eval().forward_features(x), folder_model.eval().forward_features(x)]
torch.save(outputs, "out.pt")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_file, from_folder = torch.load(tmp_path / "out.pt")
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(from_file, checkpoint_student(ema_checkpoint, "student_ema")
                                   .forward_features(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(from_folder, checkpoint_student(checkpoint).forward_features(x),
                                   rtol=1e-6, atol=1e-6)


def test_legacy_checkpoint_takes_the_architecture_from_model_config(tmp_path, checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    # the earlier run's format: compile/DDP prefixes and no stored config
    legacy = {"student": {f"_orig_mod.{k}": v for k, v in ckpt["student"].items()}, "epoch": 1}
    legacy_path = str(tmp_path / "legacy.pth")
    torch.save(legacy, legacy_path)
    model_yaml = tmp_path / "model.yaml"
    import yaml
    model_yaml.write_text(yaml.safe_dump(ckpt["config"]["model"]))
    out = str(tmp_path / "legacy.safetensors")
    assert export_student.main(["--checkpoint", legacy_path, "--model_config", str(model_yaml),
                                "--out", out]) == 0
    model, _ = timm_load(out, str(tmp_path / "legacy.json"))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(batch()),
                                   checkpoint_student(checkpoint).forward_features(batch()),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case,needle", [
    ("missing", "not found"),
    ("no_ema", "has no 'student_ema' entry"),
    ("bad_out", "name a .safetensors file"),
    ("exists", "exists; pass --force"),
    ("wrong_arch", "does not fit"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, checkpoint, capsys, case, needle):
    out = str(tmp_path / "s.safetensors")
    args = {"missing": ["--checkpoint", str(tmp_path / "nope.pth"), "--out", out],
            "no_ema": ["--checkpoint", checkpoint, "--out", out, "--weights", "ema"],
            "bad_out": ["--checkpoint", checkpoint, "--out", str(tmp_path / "s.pth")],
            "exists": ["--checkpoint", checkpoint, "--out", out],
            "wrong_arch": ["--checkpoint", checkpoint, "--out", out]}[case]
    if case == "exists":
        (tmp_path / "s.json").write_text("{}")
    if case == "wrong_arch":  # a student state dict that is not the stored architecture's
        ckpt = torch.load(checkpoint, weights_only=True)
        ckpt["student"] = {k: v for k, v in ckpt["student"].items()
                           if not k.startswith("blocks.1.")}
        args[1] = str(tmp_path / "cut.pth")
        torch.save(ckpt, args[1])
    before = sorted(os.listdir(tmp_path))
    assert export_student.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert sorted(os.listdir(tmp_path)) == before
