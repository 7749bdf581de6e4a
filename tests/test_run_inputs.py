"""One place decides whether a run's inputs are unchanged (checkpoint.check_same_inputs): the
config, the digest of the training images and the teacher's weights. Trainer resume and
run_experiments' arm reuse both ask it."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import distill_trainer
import run_experiments
from checkpoint import check_same_inputs, load_checkpoint, teacher_record
from config import UserError
from helpers import TINY_VIT, class_image, make_imagefolder, tiny_config, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def teacher_file(path, seed):
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                              img_size=32, **TINY_VIT)
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture
def half_run(tmp_path, capsys):
    """Epoch 1 of 2 trained on a 64-image subset of a data folder, with a teacher weights file."""
    root = make_imagefolder(tmp_path / "data", train_per_class=20, test_per_class=4)
    weights = teacher_file(tmp_path / "teacher.pth", seed=1)
    run_dir = str(tmp_path / "run")
    extra = {"data.max_samples": 64, "model.teacher_weights": weights, "train.stop_after_epoch": 1}
    argv = ["--override", *tiny_overrides(root, run_dir, **extra)]
    assert distill_trainer.main(argv) == 0
    capsys.readouterr()
    return {"root": root, "weights": weights, "run_dir": run_dir, "argv": argv, "extra": extra}


def rerun(run, capsys, argv=None):
    code = distill_trainer.main(argv or run["argv"])
    return code, capsys.readouterr()


def add_image(root, split="train", cls="circle", name="extra.png"):
    image = Image.fromarray(class_image(0, np.random.default_rng(7)))
    image.save(os.path.join(root, split, cls, name))


def test_checkpoint_records_the_inputs(half_run):
    ckpt = load_checkpoint(os.path.join(half_run["run_dir"], "checkpoint_latest.pth"))
    inputs = ckpt["inputs"]
    assert len(inputs["data"]) == 16 and len(inputs["teacher"]["weights"]) == 16
    assert inputs["teacher"]["file"]["path"] == half_run["weights"]


def test_resume_refuses_other_teacher_weights(half_run, capsys):
    """Issue 17.2: the file named by model.teacher_weights overwritten between two epochs."""
    teacher_file(half_run["weights"], seed=2)
    code, out = rerun(half_run, capsys)
    assert code == 2 and "Traceback" not in out.err
    line = out.err.strip()
    assert "\n" not in line and line.startswith("error: ")
    assert "teacher weights (" + half_run["weights"] in line
    assert "--no_resume" in line


def test_resume_accepts_a_touched_teacher_file_with_the_same_weights(half_run, capsys):
    st = os.stat(half_run["weights"])
    os.utime(half_run["weights"], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    code, out = rerun(half_run, capsys)
    assert code == 0, out.err
    assert "resumed from" in out.out


@pytest.mark.parametrize("change", ["added", "removed", "replaced"])
def test_resume_refuses_other_training_images(half_run, capsys, change):
    """Issue 17.3: with max_samples the subset changes when any image of the folder changes."""
    folder = os.path.join(half_run["root"], "train", "circle")
    if change == "added":
        add_image(half_run["root"])
    elif change == "removed":
        os.remove(os.path.join(folder, sorted(os.listdir(folder))[0]))
    else:
        image = Image.fromarray(class_image(1, np.random.default_rng(9)))
        image.save(os.path.join(folder, "0000.png"))
    code, out = rerun(half_run, capsys)
    assert code == 2 and "Traceback" not in out.err, out.err
    assert "data (the selected training images)" in out.err and out.err.count("\n") == 1


def test_an_added_test_image_does_not_block_the_resume(half_run, capsys):
    add_image(half_run["root"], split="test")
    code, out = rerun(half_run, capsys)
    assert code == 0, out.err


def test_old_checkpoint_without_inputs_resumes_on_its_config(half_run, capsys):
    path = os.path.join(half_run["run_dir"], "checkpoint_latest.pth")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["inputs"]
    torch.save(ckpt, path)
    add_image(half_run["root"], split="test")
    code, out = rerun(half_run, capsys)
    assert code == 0, out.err


def test_teacher_record_rebuilds_only_when_the_file_changed(tmp_path):
    path = teacher_file(tmp_path / "t.pth", seed=0)
    built = []

    def build():
        built.append(1)
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                  img_size=32, **TINY_VIT)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    first = teacher_record(path, build)
    assert teacher_record(path, build, stored=first) == first and len(built) == 1
    teacher_file(path, seed=3)
    assert teacher_record(path, build, stored=first)["weights"] != first["weights"]
    assert len(built) == 2


def test_code_version_is_noted_not_refused(half_run):
    path = os.path.join(half_run["run_dir"], "checkpoint_latest.pth")
    ckpt = load_checkpoint(path)
    cfg = tiny_config(half_run["root"], half_run["run_dir"], **half_run["extra"])
    now = {**ckpt["inputs"], "code": "another sha"}
    noted = check_same_inputs(path, ckpt, cfg.to_dict(), now, "way out")
    assert list(noted) == ["code version (git sha)"]
    with pytest.raises(UserError, match="images\) [0-9a-f]{16} -> x; way out"):
        check_same_inputs(path, ckpt, cfg.to_dict(), {**now, "data": "x"}, "way out")


@pytest.mark.parametrize("change", ["teacher", "data", "touched"])
def test_finished_arm_is_not_reused_after_its_inputs_changed(half_run, capsys, change):
    """run_experiments reuses a finished arm through the same check as a resume; a touched teacher
    file is rebuilt (on the CPU) and found to hold the same weights."""
    one_epoch = {**half_run["extra"], "train.num_epochs": 1, "train.save_epochs": [1],
                 "train.stop_after_epoch": None}
    cfg = tiny_config(half_run["root"], half_run["run_dir"], **one_epoch)
    shutil.rmtree(half_run["run_dir"])
    assert distill_trainer.train(cfg) == 0
    plan = {"arm": "kd", "seed": 0, "cfg": cfg, "dir": cfg.train.checkpoint_dir,
            "final_path": os.path.join(cfg.train.checkpoint_dir, "checkpoint_epoch_1.pth")}
    capsys.readouterr()
    run_experiments.train_arm(plan)
    assert "final checkpoint exists: skipping training" in capsys.readouterr().out
    if change == "touched":
        st = os.stat(half_run["weights"])
        os.utime(half_run["weights"], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
        run_experiments.train_arm(plan)
        assert "final checkpoint exists: skipping training" in capsys.readouterr().out
        return
    if change == "teacher":
        teacher_file(half_run["weights"], seed=5)
    else:
        add_image(half_run["root"])
    needle = "teacher weights" if change == "teacher" else "selected training images"
    with pytest.raises(UserError, match=needle):
        run_experiments.train_arm(plan)
