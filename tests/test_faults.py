"""Faults and bad input: every user mistake is one `error:` line and exit 2; no crash, kill or full
disk loses a run.

- bad input: a parametrized suite over both entry scripts, run in-process (main(argv), capsys)
  because each subprocess pays ~5-10 s of imports; a handful of the same mistakes also go through
  the real CLIs;
- SIGKILL at seeded random moments (one of them inside a checkpoint write), resume, compare with an
  uninterrupted run bit for bit;
- a non-finite loss (exit 3), a failed checkpoint write (exit 2), and no silent fallback to
  random/downloaded weights or another dataset.
"""
from __future__ import annotations

import builtins
import errno
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import timm
import torch
import torchvision
from PIL import Image

import distill_trainer
import evaluate_checkpoints
from config import DataConfig
from helpers import REPO, TINY_VIT, make_imagefolder, tiny_config, tiny_overrides
from data_loader import load_split


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def error_lines(stderr: str):
    """The lines a user reads, warnings left out: `warning: ...` lines and, from code that runs
    outside the entry scripts' one-line format, Python's own (file:line: XWarning: ... plus the
    indented source line)."""
    return [line for line in stderr.splitlines() if line.strip() and "Warning: " not in line
            and not line.startswith(("warning: ", " ", "\t"))]


def assert_one_error_line(code, stderr, needle, expected_code=2):
    lines = error_lines(stderr)
    assert code == expected_code, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


def call_main(module, argv, capsys):
    """module.main(argv) in-process; argparse mistakes end in SystemExit, which a CLI turns into the
    exit code."""
    capsys.readouterr()
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ----------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def bad_roots(tmp_path_factory):
    """Image folders with one defect each, copied from a small good one."""
    base = make_imagefolder(
        tmp_path_factory.mktemp("good_small"), train_per_class=4, test_per_class=2
    )
    out = {}

    def variant(name, damage):
        root = str(tmp_path_factory.mktemp(name))
        shutil.rmtree(root)
        shutil.copytree(base, root)
        damage(root)
        out[name] = root

    variant("no_train", lambda r: shutil.rmtree(os.path.join(r, "train")))
    variant("no_test", lambda r: shutil.rmtree(os.path.join(r, "test")))
    variant(
        "empty_class",
        lambda r: [os.remove(f) for f in glob.glob(os.path.join(r, "train", "checker", "*"))],
    )
    variant("classes_differ", lambda r: shutil.rmtree(os.path.join(r, "test", "checker")))
    variant(
        "bad_image",
        lambda r: open(os.path.join(r, "train", "circle", "0001.png"), "wb").write(b"not a png"),
    )
    variant(
        "mixed_sizes",
        lambda r: Image.new("RGB", (16, 16)).save(os.path.join(r, "train", "circle", "0001.png")),
    )

    def one_test_image(r):
        for split in ("train", "test"):
            for name in ("hstripes", "vstripes", "checker"):
                shutil.rmtree(os.path.join(r, split, name))
        os.remove(os.path.join(r, "test", "circle", "0001.png"))
    variant("one_test_image", one_test_image)
    out["missing"] = os.path.join(base, "does_not_exist")
    return out


GOOD_RUN = {"train.num_epochs": 1, "train.save_epochs": [1]}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, synthetic_root):
    """A finished 1-epoch tiny run: checkpoint_epoch_1.pth, checkpoint_latest.pth, log.jsonl."""
    run_dir = str(tmp_path_factory.mktemp("good") / "run")
    argv = ["--override", *tiny_overrides(synthetic_root, run_dir, **GOOD_RUN)]
    assert distill_trainer.main(argv) == 0
    return run_dir


@pytest.fixture(scope="module")
def foreign_weights(tmp_path_factory):
    """A timm ViT state dict of another width (48) than the tiny teacher config (32)."""
    model = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=32,
        **{**TINY_VIT, "embed_dim": 48},
    )
    path = str(tmp_path_factory.mktemp("foreign") / "vit48.pth")
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def other_root(tmp_path_factory):
    """Other images, as many as synthetic_root holds: a resume on it would see the same step
    plan."""
    return make_imagefolder(tmp_path_factory.mktemp("other_data"), seed=1)


class Ctx:
    """What a case needs to build its argv: data roots, a finished run, files written on demand."""

    def __init__(
        self, tmp_path, synthetic_root, bad_roots, good_run, foreign_weights, other_root,
        monkeypatch,
    ):
        self.tmp, self.root, self.bad, self.good_run, self.foreign = (
            tmp_path, synthetic_root, bad_roots, good_run, foreign_weights,
        )
        self.other_root, self.monkeypatch, self.held = other_root, monkeypatch, []
        self.run_dir = str(tmp_path / "run")

    def home(self, name, source):
        """`~/name` under a HOME of this test holding a copy of `source`; returns the path as a user
        types it."""
        home = self.tmp / "home"
        home.mkdir(exist_ok=True)
        shutil.copy(source, home / name)
        self.monkeypatch.setenv("HOME", str(home))
        return f"~/{name}"

    def hold_lock(self, run_dir):
        """Locks run_dir as a running trainer does (flock on <run_dir>/.lock) until the test
        ends."""
        import fcntl
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since today".encode())
        self.held.append(fd)
        return run_dir

    def train(self, root=None, run_dir=None, **extra):
        return ["--override", *tiny_overrides(root or self.root, run_dir or self.run_dir, **extra)]

    def file(self, name, content):
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def output(self, *parts):
        """Evaluator argv of the finished run with --output_file os.path.join(*parts)."""
        return ["--checkpoint_dir", self.good_run, "--output_file", os.path.join(*map(str, parts))]

    def folder(self, name):
        path = self.tmp / name
        path.mkdir()
        return str(path)

    def torch_file(self, name, obj):
        path = str(self.tmp / name)
        torch.save(obj, path)
        return path

    def resume(self, truncate_latest=False, root=None, latest_text=None, **extra):
        """argv that resumes from a copy of the finished 1-epoch run, with its settings except
        `extra`; latest_text replaces its checkpoint_latest.pth by a text file."""
        self.copy_of_good_run(truncate_latest)
        if latest_text is not None:
            with open(os.path.join(self.run_dir, "checkpoint_latest.pth"), "w") as f:
                f.write(latest_text)
        return self.train(root, **{**GOOD_RUN, **extra})

    def copy_of_good_run(self, truncate_latest=False):
        shutil.copytree(self.good_run, self.run_dir)
        if truncate_latest:
            latest = os.path.join(self.run_dir, "checkpoint_latest.pth")
            data = open(latest, "rb").read()
            open(latest, "wb").write(data[: len(data) // 2])
        return self.run_dir

    def nan_checkpoint_dir(self):
        """A copy of the finished run whose checkpoint_epoch_1.pth has NaN student weights."""
        run_dir = self.copy_of_good_run()
        path = os.path.join(run_dir, "checkpoint_epoch_1.pth")
        ckpt = torch.load(path, weights_only=True)
        name = next(k for k, v in ckpt["student"].items() if v.is_floating_point())
        ckpt["student"][name] = torch.full_like(ckpt["student"][name], float("nan"))
        torch.save(ckpt, path)
        return run_dir

    def legacy_format_dir(self):
        """A legacy-format checkpoint (student weights only, compile prefixes) of the tiny width-32
        student."""
        ckpt = torch.load(os.path.join(self.good_run, "checkpoint_epoch_1.pth"), weights_only=True)
        os.makedirs(self.run_dir)
        torch.save({"student": {f"_orig_mod.{k}": v for k, v in ckpt["student"].items()}},
                   os.path.join(self.run_dir, "checkpoint_epoch_1.pth"))
        return self.run_dir


@pytest.fixture
def ctx(tmp_path, synthetic_root, bad_roots, good_run, foreign_weights, other_root, monkeypatch):
    context = Ctx(
        tmp_path, synthetic_root, bad_roots, good_run, foreign_weights, other_root, monkeypatch
    )
    yield context
    for fd in context.held:
        os.close(fd)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
T, E = "train", "eval"


def case(name, script, build, needle, *marks):
    return pytest.param(script, build, needle, id=name, marks=marks)


TRAINER_CASES = [
    # -------- config files and flags (fail at load, milliseconds)
    case(
        "yaml_syntax",
        T,
        lambda c: c.train() + ["--train_config", c.file("t.yaml", "batch_size: [8, 16\n")],
        "t.yaml: YAML syntax error at line",
    ),
    case(
        "yaml_not_mapping",
        T,
        lambda c: ["--data_config", c.file("d.yaml", "- cifar10\n")],
        "expected a mapping",
    ),
    case(
        "config_file_missing",
        T,
        lambda c: ["--model_config", str(c.tmp / "nope.yaml")],
        "nope.yaml: config file not found",
    ),
    case(
        "unknown_key_data_file",
        T,
        lambda c: c.train() + ["--data_config", c.file("d.yaml", "datset_name: x\n")],
        "d.yaml: unknown key 'data.datset_name' (did you mean 'dataset_name'?)",
    ),
    case(
        "unknown_key_train_file",
        T,
        lambda c: ["--train_config", c.file("t.yaml", "learning_rat: 0.1\n")],
        "t.yaml: unknown key 'train.learning_rat' (did you mean 'learning_rate'?)",
    ),
    case(
        "unknown_key_model_file",
        T,
        lambda c: ["--model_config", c.file("m.yaml", "teacher_nam: x\n")],
        "m.yaml: unknown key 'model.teacher_nam'",
    ),
    case(
        "override_unknown_section",
        T,
        lambda c: c.train() + ["--override", "trian.batch_size=8"],
        "unknown section 'trian'",
    ),
    case(
        "override_without_value",
        T,
        lambda c: c.train() + ["--override", "train.batch_size"],
        "expected SECTION.KEY=VALUE",
    ),
    case(
        "wrong_type",
        T,
        lambda c: c.train(**{"train.batch_size": "eight"}),
        "key 'train.batch_size' must be an integer, got 'eight'",
    ),
    case(
        "int_key_scientific",
        T,
        lambda c: c.train(**{"train.num_epochs": "1e1"}),
        "key 'train.num_epochs' must be an integer, got '1e1'",
    ),
    case(
        "batch_size_zero",
        T,
        lambda c: c.train(**{"train.batch_size": 0}),
        "'train.batch_size' must be > 0",
    ),
    case(
        "epochs_negative",
        T,
        lambda c: c.train(**{"train.num_epochs": -1}),
        "'train.num_epochs' must be > 0",
    ),
    case(
        "lr_zero",
        T,
        lambda c: c.train(**{"train.learning_rate": 0}),
        "'train.learning_rate' must be > 0",
    ),
    case(
        "save_epochs_beyond_num_epochs",
        T,
        lambda c: c.train(**{"train.save_epochs": [1, 5]}),
        "'train.save_epochs' has [5] beyond train.num_epochs=2",
    ),
    case(
        "bad_choice",
        T,
        lambda c: c.train(**{"train.device": "tpu"}),
        "must be one of auto, cuda, cpu",
    ),
    case(
        "image_size_mismatch",
        T,
        lambda c: c.train(**{"data.image_size": 32}),
        "'data.image_size'=32 must equal model.student_img_size=24",
    ),
    case(
        "blur_prob_range",
        T,
        lambda c: c.train(**{"train.blur_prob": 1.5}),
        "'train.blur_prob' must be in [0, 1]",
    ),
    case(
        "unknown_flag",
        T,
        lambda c: c.train() + ["--resume_from", "x"],
        "unrecognized arguments: --resume_from",
    ),
    case(
        "cuda_without_gpu",
        T,
        lambda c: c.train(**{"train.device": "cuda"}),
        "train.device=cuda but torch sees no CUDA GPU",
        NO_GPU,
    ),
    case(
        "cuda_graphs_true_without_gpu",
        T,
        lambda c: c.train(**{"train.cuda_graphs": True}),
        "train.cuda_graphs=true needs a single-process CUDA run, this is a CPU run",
        NO_GPU,
    ),
    case(
        "cuda_graphs_bad_value",
        T,
        lambda c: c.train(**{"train.cuda_graphs": "yes please"}),
        "key 'train.cuda_graphs' must be one of auto, true, false",
    ),
    case(
        "checkpoint_dir_not_writable",
        T,
        lambda c: c.train(run_dir=c.file("plain_file", "x") + "/run"),
        "is not writable (Not a directory)",
    ),
    # -------- data
    case(
        "dataset_root_missing",
        T,
        lambda c: c.train(c.bad["missing"]),
        "data.dataset_root not found",
    ),
    case(
        "imagefolder_without_train",
        T,
        lambda c: c.train(c.bad["no_train"]),
        "train: folder not found",
    ),
    case(
        "imagefolder_without_test", T, lambda c: c.train(c.bad["no_test"]), "test: folder not found"
    ),
    case(
        "empty_class_folder",
        T,
        lambda c: c.train(c.bad["empty_class"]),
        "checker: class folder has no images",
    ),
    case(
        "class_folders_differ",
        T,
        lambda c: c.train(c.bad["classes_differ"]),
        "class folders differ (checker)",
    ),
    case(
        "unreadable_image",
        T,
        lambda c: c.train(c.bad["bad_image"]),
        "0001.png: cannot decode image",
    ),
    case(
        "mixed_image_sizes",
        T,
        lambda c: c.train(c.bad["mixed_sizes"]),
        "0001.png: image size (16, 16) differs",
    ),
    case(
        "batch_larger_than_dataset",
        T,
        lambda c: c.train(**{"train.batch_size": 1000}),
        "train.batch_size=1000 exceeds the 96 training images",
    ),
    case(
        "no_fallback_cifar_missing",
        T,
        lambda c: c.train(**{"data.dataset_name": "cifar10", "data.download": False}),
        "cifar10: dataset not found or corrupted",
    ),
    # -------- models and teacher weights
    case(
        "no_fallback_teacher_weights_missing",
        T,
        lambda c: c.train(
            **{"model.teacher_weights": str(c.tmp / "dinov2.pth"), "model.teacher_pretrained": True}
        ),
        "dinov2.pth: file not found",
    ),
    case(
        "teacher_weights_unknown_format",
        T,
        lambda c: c.train(**{"model.teacher_weights": c.file("w.ckpt", "hello")}),
        "w.ckpt cannot be read",
    ),
    case(
        "teacher_weights_no_tensors",
        T,
        lambda c: c.train(**{"model.teacher_weights": c.torch_file("w.pth", {"epoch": 3})}),
        "w.pth is not a recognised weights file",
    ),
    case(
        "no_fallback_teacher_weights_other_arch",
        T,
        lambda c: c.train(**{"model.teacher_weights": c.foreign}),
        "vit48.pth does not fit the architecture",
    ),
    case(
        "teacher_name_not_timm",
        T,
        lambda c: c.train(**{"model.teacher_name": "vit_smal_patch14_dinov2"}),
        "model.teacher_name=vit_smal_patch14_dinov2 is not a timm model (did you mean",
    ),
    case(
        "student_name_not_timm",
        T,
        lambda c: c.train(**{"model.student_name": "vit_smoll_patch16_224"}),
        "model.student_name 'vit_smoll_patch16_224' is not a timm model",
    ),
    case(
        "teacher_img_size_not_multiple",
        T,
        lambda c: c.train(**{"model.teacher_img_size": 36}),
        "model.teacher_img_size=36 is not a multiple of the teacher patch size 8",
    ),
    case(
        "student_img_size_not_multiple",
        T,
        lambda c: c.train(**{"model.student_img_size": 28, "data.image_size": 28}),
        "model.student_img_size=28 is not a multiple of the student patch size 8",
    ),
    case(
        "student_kwargs_heads",
        T,
        lambda c: c.train(
            **{"model.student_kwargs": {**TINY_VIT, "embed_dim": 30, "num_heads": 4}}
        ),
        "model.student_kwargs",
    ),
    # -------- resuming from a checkpoint_dir that holds something else
    case(
        "resume_other_model_config",
        T,
        lambda c: c.resume(**{"model.projection": "learned"}),
        "was trained with other settings: model.projection frozen -> learned; resume with the"
        " stored values",
    ),
    case(
        "resume_other_objective",
        T,
        lambda c: c.resume(**{"train.objective": "supervised"}),
        "was trained with other settings: train.objective distill -> supervised",
    ),
    case(
        "resume_truncated_latest",
        T,
        lambda c: c.resume(truncate_latest=True),
        "is truncated or corrupt",
    ),
    # -------- issue 13: silent wrong runs
    case(
        "student_kwargs_without_spaces",
        T,
        lambda c: c.train() + ["--override", "model.student_kwargs={embed_dim:32,depth:1}"],
        "--override model.student_kwargs={embed_dim:32,depth:1}: key 'model.student_kwargs' has no"
        " value for 'embed_dim:32', 'depth:1'; YAML needs a space after each colon ({embed_dim: 32,"
        " depth: 1})",
    ),
    case(
        "teacher_kwargs_without_spaces",
        T,
        lambda c: c.train() + ["--override", "model.teacher_kwargs={embed_dim:32, depth: 2}"],
        "key 'model.teacher_kwargs' has no value for 'embed_dim:32'",
    ),
    case(
        "kwargs_checked_before_the_data",
        T,  # a typo costs no data loading (or download) first
        lambda c: c.train(c.bad["missing"], **{"model.teacher_kwargs": {**TINY_VIT, "dept": 1}}),
        "model.teacher_kwargs: 'dept' is not an argument of timm's VisionTransformer",
    ),
    case(
        "student_kwargs_not_an_argument",
        T,
        lambda c: c.train(**{"model.student_kwargs": {**TINY_VIT, "embed_dimm": 32}}),
        "model.student_kwargs: 'embed_dimm' is not an argument of timm's VisionTransformer "
        "(vit_small_patch16_224); did you mean 'embed_dim'?",
    ),
    case(
        "teacher_kwargs_not_an_argument",
        T,
        lambda c: c.train(**{"model.teacher_kwargs": {**TINY_VIT, "depht": 1}}),
        "model.teacher_kwargs: 'depht' is not an argument of timm's VisionTransformer",
    ),
    case(
        "resume_other_lr",
        T,
        lambda c: c.resume(**{"train.learning_rate": 1e-3}),
        "was trained with other settings: train.learning_rate 0.0005 -> 0.001; resume with the"
        " stored values",
    ),
    case(
        "resume_other_seed",
        T,
        lambda c: c.resume(**{"train.seed": 1}),
        "other settings: train.seed 0 -> 1;",
    ),
    case(
        "resume_other_loss_weights",
        T,
        lambda c: c.resume(**{"train.distill_loss_weights": {"cls": 1.0, "patch": 0.25}}),
        'train.distill_loss_weights {"cls": 1.0, "patch": 0.5} -> {"cls": 1.0, "patch": 0.25}',
    ),
    case(
        "resume_other_dataset_same_size",
        T,
        lambda c: c.resume(root=c.other_root),
        "or start over with --no_resume (moves the old files aside) or another"
        " train.checkpoint_dir",
    ),
    case(
        "run_dir_in_use",
        T,
        lambda c: c.train(run_dir=c.hold_lock(c.run_dir)),
        f"is in use by another trainer (pid {os.getpid()} on {socket.gethostname()} since today);"
        " wait for it",
    ),
    case(
        "resume_text_latest",
        T,
        lambda c: c.resume(latest_text="batch_size: 64\n"),
        "checkpoint_latest.pth is not a checkpoint: it holds text ('batch_size: 64')",
    ),
    # -------- issue 13: one line instead of a traceback, or a clearer line
    case(
        "train_config_not_utf8",
        T,
        lambda c: c.train()
        + ["--train_config", c.file("t.yaml", "# r\xe9glages\nbatch_size: 8\n".encode("latin-1"))],
        "t.yaml: not UTF-8 text (byte 0xe9 on line 1); a config file is YAML text",
    ),
    case(
        "checkpoint_as_train_config",
        T,
        lambda c: c.train() + ["--train_config", os.path.join(c.good_run, "checkpoint_latest.pth")],
        "checkpoint_latest.pth: a zip archive (a checkpoint?); a config file is YAML text",
    ),
    case(
        "teacher_weights_under_home",
        T,
        lambda c: c.train(**{"model.teacher_weights": c.home("vit48.pth", c.foreign)}),
        "model.teacher_weights=HOME/vit48.pth does not fit the architecture",
    ),
    case(
        "float_key_not_a_number",
        T,
        lambda c: c.train(**{"train.learning_rate": "1e-3.5"}),
        "key 'train.learning_rate' must be a number, got '1e-3.5'",
    ),
    case(
        "save_epochs_beyond_names_the_override",
        T,
        lambda c: c.train(**{"train.save_epochs": [1, 5]}),
        "error: --override train.save_epochs=[1, 5]: key 'train.save_epochs' has [5] beyond"
        " train.num_epochs=2 (--override train.num_epochs=2); drop them or raise num_epochs, e.g."
        " --override train.save_epochs=[1,2]",
    ),
    case(
        "save_epochs_beyond_one_epoch",
        T,
        lambda c: c.train(**{"train.num_epochs": 1}),
        "has [2] beyond train.num_epochs=1 (--override train.num_epochs=1); drop them or raise"
        " num_epochs, e.g. --override train.save_epochs=[1]",
    ),
    case(
        "min_lr_names_the_override",
        T,
        lambda c: c.train(**{"train.min_lr": 1.0}),
        "error: --override train.min_lr=1.0: key 'train.min_lr'=1.0 exceeds"
        " train.learning_rate=0.0005 (",
    ),
    # -------- issue 17: non-finite floats, seeds and probabilities refused at load
    case(
        "lr_inf",
        T,
        lambda c: c.train(**{"train.learning_rate": ".inf"}),
        "--override train.learning_rate=.inf: key 'train.learning_rate' must be a finite "
        "number, got inf",
    ),
    case(
        "lr_nan",
        T,
        lambda c: c.train(**{"train.learning_rate": ".nan"}),
        "key 'train.learning_rate' must be a finite number, got nan",
    ),
    case(
        "weight_decay_nan",
        T,
        lambda c: c.train(**{"train.weight_decay": ".nan"}),
        "key 'train.weight_decay' must be a finite number, got nan",
    ),
    case(
        "warmup_inf",
        T,
        lambda c: c.train(**{"train.warmup_epochs": "1.0e+999"}),
        "key 'train.warmup_epochs' must be a finite number, got inf",
    ),
    case(
        "loss_weight_inf",
        T,
        lambda c: c.train(**{"train.distill_loss_weights": {"cls": float("inf"), "patch": 1}}),
        "key 'train.distill_loss_weights' must be a finite number, got {'cls': inf",
    ),
    case(
        "seed_overflow",
        T,
        lambda c: c.train(**{"train.seed": 123456789012345678901234}),
        "key 'train.seed' must be in 0..4294967295, got 123456789012345678901234",
    ),
    case(
        "seed_negative",
        T,
        lambda c: c.train(**{"train.seed": -1}),
        "key 'train.seed' must be in 0..4294967295",
    ),
    case(
        "projection_seed_overflow",
        T,
        lambda c: c.train(**{"model.projection_seed": 2**40}),
        "key 'model.projection_seed' must be in 0..4294967295",
    ),
    case(
        "drop_path_rate_above_one",
        T,
        lambda c: c.train(**{"model.drop_path_rate": 2.0}),
        "key 'model.drop_path_rate' is a probability and must be in [0, 1), got 2.0",
    ),
    case(
        "student_kwargs_drop_rate",
        T,
        lambda c: c.train(**{"model.student_kwargs": {**TINY_VIT, "attn_drop_rate": 1.5}}),
        "key 'model.student_kwargs' has attn_drop_rate=1.5; a drop rate is a probability and "
        "must be in [0, 1)",
    ),
    # -------- issue 17: too little data for the diagnostics; inputs checked before long work
    case(
        "max_samples_one",
        T,
        lambda c: c.train(**{"data.max_samples": 1, "train.batch_size": 1}),
        "key 'data.max_samples' must be >= 2",
    ),
    case(
        "one_test_image",
        T,
        lambda c: c.train(c.bad["one_test_image"], **{"train.batch_size": 2}),
        "1 test image(s); the per-epoch diagnostics (pairwise statistics) need at least 2",
    ),
    case(
        "teacher_weights_missing_before_the_data",
        T,
        lambda c: c.train(c.bad["missing"], **{"model.teacher_weights": str(c.tmp / "w.pth")}),
        "w.pth: file not found",
    ),
]

EVAL_CASES = [
    case("eval_dir_missing", E, lambda c: ["--checkpoint_dir", c.tmp / "nope"], "--checkpoint_dir"),
    case("eval_no_checkpoints", E, lambda c: ["--checkpoint_dir", c.tmp], "for any epoch"),
    case(
        "eval_epochs_absent",
        E,
        lambda c: ["--checkpoint_dir", c.good_run, "--epochs", 7, 8],
        "no checkpoint_epoch_{N}.pth for epochs 7, 8",
    ),
    case(
        "eval_negative_epoch",
        E,
        lambda c: ["--checkpoint_dir", c.good_run, "--epochs", -1],
        "cannot be negative",
    ),
    case(
        "eval_epoch_not_int",
        E,
        lambda c: ["--checkpoint_dir", c.good_run, "--epochs", "last"],
        "argument --epochs: invalid int value: 'last'",
    ),
    case(
        "eval_checkpoint_dir_flag_missing",
        E,
        lambda c: ["--epochs", 1],
        "required: --checkpoint_dir",
    ),
    case(
        "eval_batch_size_zero",
        E,
        lambda c: ["--checkpoint_dir", c.good_run, "--batch_size", 0],
        "--batch_size must be > 0",
    ),
    case(
        "eval_probe_C_zero",
        E,
        lambda c: ["--checkpoint_dir", c.good_run, "--linear_probe_C", 0],
        "--linear_probe_C must be > 0",
    ),
    case(
        "eval_bad_device",
        E,
        lambda c: ["--checkpoint_dir", c.good_run, "--device", "gpu0"],
        "is not a device",
    ),
    case(
        "eval_output_file_not_writable",
        E,
        lambda c: [
            "--checkpoint_dir",
            c.good_run,
            "--output_file",
            c.file("plain_file", "x") + "/r.json",
        ],
        "is not writable; pass a writable --output_file",
    ),
    case(
        "eval_cuda_without_gpu",
        E,
        lambda c: ["--checkpoint_dir", c.good_run, "--device", "cuda"],
        "no CUDA GPU",
        NO_GPU,
    ),
    case(
        "eval_model_config_unknown_key",
        E,
        lambda c: [
            "--checkpoint_dir",
            c.good_run,
            "--model_config",
            c.file("m.yaml", "student_nam: x\n"),
        ],
        "m.yaml: unknown key 'model.student_nam'",
    ),
    case(
        "eval_data_config_yaml_syntax",
        E,
        lambda c: [
            "--checkpoint_dir",
            c.good_run,
            "--data_config",
            c.file("d.yaml", "dataset_root: 'x\n"),
        ],
        "d.yaml: YAML syntax error",
    ),
    # -------- issue 13
    case(
        "eval_text_file_as_checkpoint",
        E,
        lambda c: [
            "--checkpoint_dir",
            os.path.dirname(c.file("checkpoint_epoch_1.pth", "hello\n")),
            "--epochs",
            1,
        ],
        "could be evaluated: checkpoint TMP/checkpoint_epoch_1.pth is not a checkpoint: it holds"
        " text ('hello')",
    ),
    case(
        "eval_model_config_not_utf8",
        E,
        lambda c: [
            "--checkpoint_dir",
            c.good_run,
            "--model_config",
            c.file("m.yaml", b"student_name: vit\xff\n"),
        ],
        "m.yaml: not UTF-8 text (byte 0xff on line 1)",
    ),
    case(
        "eval_checkpoint_as_data_config",
        E,
        lambda c: [
            "--checkpoint_dir",
            c.good_run,
            "--data_config",
            os.path.join(c.good_run, "checkpoint_epoch_1.pth"),
        ],
        "checkpoint_epoch_1.pth: a zip archive (a checkpoint?)",
    ),
    # -------- issue 17: outputs checked before any work, devices, unusable weights
    case(
        "eval_output_is_the_run_log",
        E,
        lambda c: c.output(c.copy_of_good_run(), "log.jsonl"),
        "log.jsonl, a file of a training run (log, config, checkpoint, lock) or a cache; pass "
        "another file",
    ),
    case(
        "eval_output_is_the_run_config",
        E,
        lambda c: c.output(c.tmp, "config.yaml"),
        "config.yaml, a file of a training run",
    ),
    case(
        "eval_output_is_a_checkpoint",
        E,
        lambda c: c.output(c.tmp, "checkpoint_epoch_1.pth"),
        "checkpoint_epoch_1.pth, a file of a training run",
    ),
    case(
        "eval_output_in_tensor_cache",
        E,
        lambda c: c.output(c.root, ".tensor_cache", "r.json"),
        "a file of a training run (log, config, checkpoint, lock) or a cache",
    ),
    case(
        "eval_output_is_the_lock",
        E,
        lambda c: c.output(c.tmp, ".lock"),
        ".lock, a file of a training run",
    ),
    case(
        "eval_output_in_teacher_cache",
        E,
        lambda c: c.output(c.tmp, "teacher_cache", "meta.json"),
        "meta.json, a file of a training run (log, config, checkpoint, lock) or a cache",
    ),
    case(
        "eval_output_suffix_md",
        E,
        lambda c: c.output(c.tmp, "res.md"),
        "res.md: must end in .json (.md, .png files go beside it, same stem); pass e.g. "
        "--output_file TMP/res.json",
    ),
    case(
        "eval_output_suffix_png",
        E,
        lambda c: c.output(c.tmp, "res.png"),
        "res.png: must end in .json",
    ),
    case(
        "eval_output_is_a_directory",
        E,
        lambda c: c.output(c.folder("out.json")),
        "out.json is a directory; pass a file path",
    ),
    case(
        "eval_output_md_beside_is_a_directory",
        E,
        lambda c: c.output(c.folder("r.md")[:-3] + ".json"),
        "r.md is a directory; pass a file path",
    ),
    case(
        "eval_output_predictions_beside_is_a_directory",
        E,
        lambda c: c.output(
            c.folder("eval_predictions.npz")[: -len("eval_predictions.npz")], "eval_results.json"
        ),
        "eval_predictions.npz is a directory; pass a file path",
    ),
    case(
        "eval_device_mps",
        E,
        lambda c: ["--checkpoint_dir", c.good_run, "--device", "mps"],
        "--device mps is not supported; use cuda, cuda:N or cpu",
    ),
    case(
        "eval_nan_weights",
        E,
        lambda c: ["--checkpoint_dir", c.nan_checkpoint_dir(), "--device", "cpu"],
        "checkpoint_epoch_1.pth has non-finite (NaN/inf) weights in 1 tensors",
    ),
]


@pytest.mark.parametrize("script,build,needle", TRAINER_CASES + EVAL_CASES)
def test_mistake_is_one_error_line_exit_2(script, build, needle, ctx, capsys):
    module = distill_trainer if script == T else evaluate_checkpoints
    argv = build(ctx)
    needle = needle.replace("HOME", os.environ["HOME"]).replace("TMP", str(ctx.tmp))
    code, err = call_main(module, argv, capsys)
    assert_one_error_line(code, err, needle)


@pytest.mark.parametrize("which,needle", [
    ("truncated", "is truncated or corrupt"),
    ("other_architecture", "first mismatching key"),
])
def test_evaluator_unusable_checkpoint_is_named(which, needle, ctx, capsys):
    """A checkpoint the evaluator cannot use is named in one line; with nothing usable left that is
    exit 2."""
    if which == "truncated":
        run_dir = ctx.copy_of_good_run()
        path = os.path.join(run_dir, "checkpoint_epoch_1.pth")
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        args = ["--checkpoint_dir", run_dir, "--device", "cpu"]
    else:
        stored = torch.load(
            os.path.join(ctx.good_run, "checkpoint_epoch_1.pth"), weights_only=True
        )["config"]
        wider = {**stored["model"], "student_kwargs": {**TINY_VIT, "embed_dim": 48}}
        args = ["--checkpoint_dir", ctx.legacy_format_dir(), "--device", "cpu",
                "--model_config", ctx.file("wide.yaml", json.dumps(wider))]
    code, err = call_main(evaluate_checkpoints, args, capsys)
    assert code == 2 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert (
        line.startswith("error: no requested checkpoint") and "checkpoint_epoch_1.pth" in line
    ), line
    assert needle in line, line


@pytest.mark.slow
def test_real_cli_mistakes_one_line(tmp_path, synthetic_root):
    """The same contract through `python distill_trainer.py` / `python evaluate_checkpoints.py`, run
    concurrently.

    Three only: each pays the full import time (5-10 s); the in-process suite above covers the rest.
    """
    # an empty Hugging Face cache: the pretrained teacher is simply not there
    hf_home = tmp_path / "hf_home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1"}
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("num_epochs: 3\n  batch_size: 8\n")
    trainer = [sys.executable, os.path.join(REPO, "distill_trainer.py")]
    jobs = {
        "yaml_syntax": (trainer + ["--train_config", str(bad_yaml)], "bad.yaml: YAML syntax error"),
        # No silent fallback: no weights offline is an error, never a randomly initialised teacher.
        "teacher_offline": (
            trainer
            + [
                "--override",
                *tiny_overrides(
                    synthetic_root, str(tmp_path / "b"), **{"model.teacher_pretrained": True}
                ),
            ],
            "could not get pretrained weights for model.teacher_name",
        ),
        "eval_negative_epoch": (
            [
                sys.executable,
                os.path.join(REPO, "evaluate_checkpoints.py"),
                "--checkpoint_dir",
                str(tmp_path),
                "--epochs",
                "-2",
            ],
            "cannot be negative",
        ),
    }
    procs = {
        name: subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (cmd, _) in jobs.items()
    }
    errors = {name: proc.communicate(timeout=300)[1] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert_one_error_line(proc.returncode, errors[name], jobs[name][1])
    assert "RANDOMLY" not in errors["teacher_offline"] and not glob.glob(
        str(tmp_path / "b" / "*.pth")
    )


def test_no_silent_fallbacks_write_nothing(ctx, capsys, recwarn):
    """Named weights that are missing or do not fit, and a missing configured dataset, stop before
    any training."""
    named_but_missing = {
        "model.teacher_weights": str(ctx.tmp / "missing.pth"),
        "model.teacher_pretrained": True,
    }
    for i, extra in enumerate([named_but_missing, {"model.teacher_weights": ctx.foreign},
                               {"data.dataset_name": "cifar10", "data.download": False}]):
        run_dir = str(ctx.tmp / f"r{i}")
        code, err = call_main(distill_trainer, ctx.train(run_dir=run_dir, **extra), capsys)
        assert code == 2 and len(error_lines(err)) == 1, err
        assert not glob.glob(os.path.join(run_dir, "*.pth")) and not os.path.exists(
            os.path.join(run_dir, "log.jsonl")
        )
    # The random-init notice would mean a teacher was substituted for the named file.
    assert not [w for w in recwarn if "RANDOMLY" in str(w.message)]


# ----------------------------------------------------------------- non-finite loss, failed writes
def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def all_finite(ckpt):
    tensors = list(ckpt["student"].values()) + list((ckpt["projection"] or {}).values())
    return all(torch.isfinite(t).all() for t in tensors)


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(
    tmp_path, synthetic_root, capsys, monkeypatch
):
    run_dir = str(tmp_path / "run")
    first = {"train.num_epochs": 2, "train.save_epochs": [1, 2], "train.stop_after_epoch": 1}
    assert (
        call_main(
            distill_trainer,
            ["--override", *tiny_overrides(synthetic_root, run_dir, **first)],
            capsys,
        )[0]
        == 0
    )
    epoch_1 = os.path.join(run_dir, "checkpoint_epoch_1.pth")
    before = sha(epoch_1)
    # Resumed with an absurd learning rate in epoch 2 (the schedule is patched: a resume refuses
    # another train.learning_rate): the first update overflows the weights, the next loss is not
    # finite. save_every=1 writes checkpoint_latest after every step, so a bad one would be caught
    # on disk.
    schedule = distill_trainer.lr_schedule
    monkeypatch.setattr(
        distill_trainer, "lr_schedule", lambda total, *args: schedule(total, *args)[:6] + [1e30] * 6
    )
    blowup = {**first, "train.stop_after_epoch": None, "train.save_every": 1}
    code, err = call_main(
        distill_trainer, ["--override", *tiny_overrides(synthetic_root, run_dir, **blowup)], capsys
    )
    line = assert_one_error_line(
        code, err, "non-finite", expected_code=distill_trainer.EXIT_NONFINITE
    )
    step = int(line.split("global step ")[1].split(";")[0])
    # 6 steps per epoch: epoch 2 failed
    assert step >= 6 and "checkpoint_latest.pth is kept" in line, line
    latest = torch.load(os.path.join(run_dir, "checkpoint_latest.pth"), weights_only=True)
    assert latest["global_step"] <= step and all_finite(latest)
    assert sha(epoch_1) == before and not os.path.exists(
        os.path.join(run_dir, "checkpoint_epoch_2.pth")
    )
    assert not glob.glob(os.path.join(run_dir, "*.tmp"))


def test_nonfinite_weights_are_never_saved(tmp_path, synthetic_root):
    from distributed import DistInfo
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"))
    os.makedirs(cfg.train.checkpoint_dir)
    run = distill_trainer.build_run(cfg, DistInfo(), torch.device("cpu"))
    with torch.no_grad():
        run.trainable.student.cls_token.fill_(float("inf"))
    with pytest.raises(
        distill_trainer.NonFiniteLoss, match="non-finite weights after global step 5"
    ):
        distill_trainer.save_latest(run, distill_trainer.Position(0, 5, 5, torch.zeros(4)))
    assert os.listdir(cfg.train.checkpoint_dir) == []


def test_disk_full_keeps_previous_checkpoint(tmp_path, synthetic_root, capsys, monkeypatch):
    run_dir = str(tmp_path / "run")
    real_save, calls = torch.save, []

    def full_disk_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "student" in obj:
            calls.append(obj["epoch"])
            # Writes: epoch-1 file, latest (epoch 1), epoch-2 file, latest (epoch 2) <- the disk
            # fills up here.
            if len(calls) == 4:
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    code, err = call_main(
        distill_trainer, ["--override", *tiny_overrides(synthetic_root, run_dir)], capsys
    )
    line = assert_one_error_line(code, err, "No space left on device")
    assert "checkpoint_latest.pth" in line and "the previous file is untouched" in line, line
    latest = torch.load(os.path.join(run_dir, "checkpoint_latest.pth"), weights_only=True)
    epoch_1 = torch.load(os.path.join(run_dir, "checkpoint_epoch_1.pth"), weights_only=True)
    assert latest["epoch"] == 1 and all(
        torch.equal(v, epoch_1["student"][k]) for k, v in latest["student"].items()
    )
    assert not glob.glob(os.path.join(run_dir, "*.tmp"))


class FillsUp:
    """A file on a disk that fills up: a write puts half its bytes down, then fails with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def disk_fills_up_at(monkeypatch, name, nth):
    """The nth file opened for writing whose path contains `name` (directly, or a temp file beside
    it) fills up."""
    real_open, real_fdopen, opened = builtins.open, os.fdopen, []

    def maybe_full(f, path, mode):
        if name in os.path.basename(str(path)) and any(m in mode for m in "wax"):
            opened.append(path)
            if len(opened) == nth:
                return FillsUp(f)
        return f

    monkeypatch.setattr(builtins, "open", lambda file, mode="r", *a, **k: maybe_full(
        real_open(file, mode, *a, **k), file, mode))
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: maybe_full(
        real_fdopen(fd, mode, *a, **k), os.readlink(f"/proc/self/fd/{fd}"), mode))
    return opened


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="names an open file through /proc (Linux)"
)
def test_disk_full_while_logging_keeps_the_log(tmp_path, synthetic_root, capsys, monkeypatch):
    """log.jsonl gets epoch 0, epoch 1, then the disk fills while writing epoch 2's line: one line,
    exit 2, the log as it was (not emptied, no half line), and the rerun resumes and completes it
    (item 6)."""
    run_dir = str(tmp_path / "run")
    argv = ["--override", *tiny_overrides(synthetic_root, run_dir)]
    opened = disk_fills_up_at(monkeypatch, "log.jsonl", 3)
    code, err = call_main(distill_trainer, argv, capsys)
    assert len(opened) == 3, opened
    line = assert_one_error_line(
        code, err, "log.jsonl: No space left on device; the previous file is untouched"
    )
    assert line.startswith(f"error: could not write {os.path.join(run_dir, 'log.jsonl')}"), line
    assert [json.loads(r)["epoch"] for r in open(os.path.join(run_dir, "log.jsonl"))] == [0, 1]
    assert not glob.glob(os.path.join(run_dir, "*.tmp"))
    monkeypatch.undo()
    assert call_main(distill_trainer, argv, capsys)[0] == 0
    assert [json.loads(r)["epoch"] for r in open(os.path.join(run_dir, "log.jsonl"))] == [0, 1, 2]


def test_lock_file_left_by_a_killed_run_does_not_block(tmp_path, synthetic_root, capsys):
    """flock dies with its process: a .lock file without a holder is taken over and removed at the
    end (item 3)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("pid 4242 on a node that was rebooted")
    argv = ["--override", *tiny_overrides(synthetic_root, str(run_dir), **GOOD_RUN)]
    assert call_main(distill_trainer, argv, capsys)[0] == 0
    assert sorted(os.listdir(run_dir)) == [
        "checkpoint_epoch_1.pth", "checkpoint_latest.pth", "config.yaml", "log.jsonl",
    ]


@pytest.mark.parametrize(
    "failure", ["dataset_root_missing", "teacher_weights_do_not_fit", "cifar_download_fails"]
)
def test_failed_first_run_leaves_no_folders(failure, ctx, capsys, monkeypatch):
    """A run that stops on bad input creates no run directory (nor parents) and no data folder (item
    12)."""
    import urllib.error

    # torchvision creates root, then fails to reach the server
    def offline_cifar(root, train, download):
        os.makedirs(root, exist_ok=True)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline_cifar)
    extra = {"dataset_root_missing": {"data.dataset_root": ctx.bad["missing"]},
             "teacher_weights_do_not_fit": {"model.teacher_weights": ctx.foreign},
             "cifar_download_fails": {"data.dataset_name": "cifar10", "data.download": True,
                                      "data.dataset_root": str(ctx.tmp / "data")}}[failure]
    before = sorted(os.listdir(ctx.tmp))
    code, err = call_main(
        distill_trainer, ctx.train(run_dir=str(ctx.tmp / "runs" / "kd"), **extra), capsys
    )
    assert code == 2 and len(error_lines(err)) == 1, err
    assert sorted(os.listdir(ctx.tmp)) == before


def test_second_ctrl_c_stops_at_once_in_one_line(tmp_path, synthetic_root, capsys, monkeypatch):
    """The first Ctrl-C asks for a save at the step's end; a second one raises at once: one line,
    exit 130 (item 7)."""
    previous = signal.getsignal(signal.SIGINT)
    with distill_trainer.StopSignal() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.interrupted
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous

    def interrupted_twice(cfg, no_resume):
        raise KeyboardInterrupt
    monkeypatch.setattr(distill_trainer, "train", interrupted_twice)
    code, err = call_main(
        distill_trainer, ["--override", *tiny_overrides(synthetic_root, str(tmp_path))], capsys
    )
    assert (
        code == 130
        and err.startswith("interrupted twice (Ctrl-C): stopped at once")
        and err.count("\n") == 1
    )


# ----------------------------------------------------------------- SIGKILL at random moments
# The trainer's imports take 5-10 s on a busy machine; a fork server pays them once and runs every
# attempt as a forked child (a real process, SIGKILLed for real). It also slows checkpoint writes,
# in the test only: each write puts half its bytes on disk, flushes, sleeps, then writes the rest,
# so kills can land inside a write.
FORK_SERVER = r'''
import io, json, os, sys, time, traceback
sys.path.insert(0, sys.argv[1])
import torch
import distill_trainer, dinov2_patcher  # noqa: F401  (the slow imports, once)

real_save = torch.save
pause = {"seconds": 0.0, "marker": None}


def paused_save(obj, f, *args, **kwargs):
    if not (isinstance(obj, dict) and "student" in obj and hasattr(f, "write")):
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    if pause["marker"]:
        open(pause["marker"], "w").close()
    time.sleep(pause["seconds"])
    f.write(data[len(data) // 2:])


torch.save = paused_save
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        pause.update(seconds=job["pause"], marker=job.get("marker"))
        code = 1
        try:
            code = distill_trainer.main(job["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class ForkServer:
    def __init__(self, tmp_path):
        script = tmp_path / "fork_server.py"
        script.write_text(FORK_SERVER)
        # One thread in every attempt: resumed and uninterrupted runs must do identical float
        # arithmetic.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(script), REPO], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
        self.count = 0
        self.tmp = tmp_path

    def start(self, argv, pause=0.0, marker=None):
        self.count += 1
        self.log = str(self.tmp / f"attempt_{self.count}.log")
        job = {"argv": argv, "log": self.log, "pause": pause, "marker": marker}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def wait(self):
        return json.loads(self.proc.stdout.readline())["rc"]

    def output(self):
        return open(self.log).read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def kill_root(tmp_path_factory):
    root = make_imagefolder(
        tmp_path_factory.mktemp("kill_data"), train_per_class=16, test_per_class=4
    )
    # Decode once now: the timed uninterrupted run must not include the one-off tensor cache build.
    for split in ("train", "test"):
        load_split(DataConfig(dataset_name="imagefolder", dataset_root=root, num_workers=0), split)
    return root


KILL_RUN = {
    "train.num_epochs": 3,
    "train.save_epochs": [1, 2, 3],
    "train.batch_size": 8,
    "train.save_every": 2,
    # 64 images / 8 = 8 steps per epoch, 24 in all, a checkpoint every 2
    "train.diag_batch_size": 8,
}
TOTAL_STEPS = 24
WRITE_PAUSE_S = 0.05


def check_loadable(run_dir):
    """Every checkpoint file present after a kill loads; returns checkpoint_latest's global step (0
    if none)."""
    for path in glob.glob(os.path.join(run_dir, "checkpoint_*.pth")):
        torch.load(path, weights_only=True)
    latest = os.path.join(run_dir, "checkpoint_latest.pth")
    return torch.load(latest, weights_only=True)["global_step"] if os.path.exists(latest) else 0


def wait_for(path_or_text, server, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path_or_text):
            return
        time.sleep(0.01)
    raise AssertionError(f"{path_or_text} never appeared:\n{server.output()[-3000:]}")


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_identical_weights(tmp_path, kill_root):
    server = ForkServer(tmp_path)
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    try:
        # The first child runs several times slower (cold caches), so the run that sets the kill
        # times is the second one; both uninterrupted runs must also agree with each other.
        for run_dir in (str(tmp_path / "warm_up"), straight):
            started = time.time()
            server.start(
                ["--override", *tiny_overrides(kill_root, run_dir, **KILL_RUN)], pause=WRITE_PAUSE_S
            )
            assert server.wait() == 0, server.output()[-3000:]
            full_seconds = time.time() - started

        argv = ["--override", *tiny_overrides(kill_root, killed, **KILL_RUN)]
        rng = random.Random(20240229)
        kills, inside_write = [], 0
        for attempt in range(7):
            step = check_loadable(killed)
            if attempt == 3:  # deterministic: wait until a checkpoint write is half done, then kill
                marker = str(tmp_path / f"half_written_{attempt}")
                pid = server.start(argv, pause=60.0, marker=marker)
                wait_for(marker, server)
            else:
                # Before the end of this attempt even if only the remaining steps were slow: the
                # kill lands somewhere in start-up, training, diagnostics or a write, never after
                # the run has finished.
                delay = rng.uniform(0.0, 0.7) * full_seconds * max(0.15, 1 - step / TOTAL_STEPS)
                pid = server.start(argv, pause=WRITE_PAUSE_S)
                time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # already exited and reaped
                pass
            rc = server.wait()
            assert rc in (-signal.SIGKILL, 0), server.output()[-3000:]
            # finished before the kill (machine faster than during the uninterrupted run)
            if rc == 0:
                break
            kills.append(check_loadable(killed))
            temp_files = glob.glob(os.path.join(killed, "*.tmp"))
            inside_write += bool(temp_files)
            if attempt == 3:
                assert temp_files, "the kill during the paused write left no temp file"
        print(
            f"checkpoint_latest global step after each kill: {kills}; {inside_write} kills inside a"
            " write"
        )
        assert len(kills) >= 5 and inside_write >= 1, (kills, inside_write)

        server.start(argv)
        assert server.wait() == 0, server.output()[-3000:]
    finally:
        server.close()
    assert not glob.glob(os.path.join(killed, "*.tmp"))  # stale temp files removed at start
    for name, other in [
        ("checkpoint_latest.pth", killed),
        ("checkpoint_epoch_1.pth", killed),
        ("checkpoint_epoch_3.pth", killed),
        ("checkpoint_epoch_3.pth", str(tmp_path / "warm_up")),
    ]:
        a = torch.load(os.path.join(straight, name), weights_only=True)
        b = torch.load(os.path.join(other, name), weights_only=True)
        assert a["global_step"] == b["global_step"], name
        for key in a["student"]:
            assert torch.equal(a["student"][key], b["student"][key]), (name, key, kills)
        for i, state in a["optimizer"]["state"].items():
            assert torch.equal(state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]), (name, i)
    logged = [json.loads(line)["epoch"] for line in open(os.path.join(killed, "log.jsonl"))]
    assert logged == [0, 1, 2, 3], logged


@pytest.mark.slow
def test_real_cli_output_and_value_checks_one_line(tmp_path):
    """Issue 17 through `python evaluate_checkpoints.py` / `python distill_trainer.py`: outputs
    and non-finite values refused before any work, run concurrently; three only (each pays the
    full import time), the in-process cases above cover the rest."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text('{"epoch": 1}\n')
    evaluator = [sys.executable, os.path.join(REPO, "evaluate_checkpoints.py"), "--checkpoint_dir",
                 str(run_dir), "--output_file"]
    trainer = [sys.executable, os.path.join(REPO, "distill_trainer.py"), "--override",
               "train.learning_rate=.nan", f"train.checkpoint_dir={tmp_path / 'never'}"]
    jobs = {
        "output_is_the_log": (evaluator + [str(run_dir / "log.jsonl")], "a file of a training run"),
        "output_md": (evaluator + [str(tmp_path / "res.md")], "res.md: must end in .json"),
        "lr_nan": (trainer, "'train.learning_rate' must be a finite number"),
    }
    procs = {name: subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (cmd, _) in jobs.items()}
    errors = {name: proc.communicate(timeout=300)[1] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert_one_error_line(proc.returncode, errors[name], jobs[name][1])
    assert (run_dir / "log.jsonl").read_text() == '{"epoch": 1}\n'
    assert not (tmp_path / "never").exists()
