"""The README's CPU smoke recipe runs exactly as written: the commands between its
`cpu-smoke-recipe` markers, from a folder that looks like a checkout, on a small synthetic image
folder in place of the CIFAR-10 JPEG tree."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import REPO, make_imagefolder, symlinked_checkout

pytestmark = pytest.mark.slow  # two CLI processes (trainer, evaluator)
# where the recipe extracts the tarball; the only text the test replaces
DATA_ROOT = "/tmp/cifar10-jpeg"


def recipe_commands() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    match = re.search(
        r"<!-- cpu-smoke-recipe\b.*?-->\n(.*?)\n<!-- /cpu-smoke-recipe -->", text, re.S
    )
    assert match, "README.md lost its cpu-smoke-recipe markers"
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    assert all(line.startswith("    ") for line in lines), lines  # one indented code block
    return "\n".join(line[4:] for line in lines)


def test_cpu_smoke_recipe_runs_as_written(tmp_path):
    commands = recipe_commands()
    assert commands.count(DATA_ROOT) == 1 and commands.startswith(
        "python distill_trainer.py"
    ), commands
    data = make_imagefolder(tmp_path / "cifar10-jpeg", train_per_class=24, test_per_class=8)
    checkout = symlinked_checkout(tmp_path / "checkout")
    bin_dir = tmp_path / "bin"  # `python` is this interpreter, whatever the machine calls python
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", "-e", "-c", commands.replace(DATA_ROOT, data)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # Warnings are one line each (issue 13, item 13), and they are all there is on stderr: the
    # random teacher's.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(
        line.startswith("warning: model.teacher_pretrained=false") for line in lines
    ), lines

    run_dir = os.path.join(checkout, "checkpoints", "cpu_smoke")
    entries = json.load(open(os.path.join(run_dir, "eval_results.json")))["entries"]
    assert [e["name"] for e in entries] == [
        "epoch_1", "epoch_2", "teacher", "teacher_direct", "untrained",
    ]
    assert entries[2]["random_init"] and entries[0]["num_classes"] == 4
    ckpt = torch.load(os.path.join(run_dir, "checkpoint_epoch_2.pth"), weights_only=True)
    assert ckpt["config"]["data"]["dataset_root"] == data
    # the tiny student, 2 blocks
    assert ckpt["student"]["cls_token"].shape[-1] == 64 and len(ckpt["student"]) < 40


def block(marker: str) -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    match = re.search(rf"<!-- {marker}\b.*?-->\n(.*?)\n<!-- /{marker} -->", text, re.S)
    assert match, f"README.md lost its {marker} markers"
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    assert all(line.startswith("    ") for line in lines), lines
    return "\n".join(line[4:] for line in lines)


def test_cpu_experiment_recipe_runs_as_written(tmp_path):
    """The README's small experiment: a stand-in teacher, 2 seeds, the report with its Answer."""
    commands = block("cpu-experiment-recipe")
    assert commands.count(DATA_ROOT) == 1 and commands.startswith("python run_experiments.py")
    data = make_imagefolder(tmp_path / "cifar10-jpeg", train_per_class=24, test_per_class=8)
    checkout = symlinked_checkout(tmp_path / "checkout")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = commands.replace(DATA_ROOT, data).replace("python ", f"{sys.executable} ", 1)
    result = subprocess.run(["bash", "-e", "-c", command], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = open(os.path.join(checkout, "experiments", "cpu_smoke", "report.md")).read()
    assert "Power gate" in report and report.count("Answer:") == 1, report[-3000:]
