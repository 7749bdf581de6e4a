"""Multi-process training (gloo on CPU), launcher detection, one trainer per run dir, Ctrl-C.

The sbatch wrappers run on a real local SLURM in test_slurm.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from config import UserError
from helpers import LONG_EPOCH, REPO, make_long_epoch_root, tiny_overrides
from distributed import detect_launcher, first_slurm_host

EXTRA = {"train.num_epochs": 2, "train.save_epochs": [2], "data.num_workers": 0}

def final_student(run_dir, epoch=2):
    return torch.load(os.path.join(run_dir, f"checkpoint_epoch_{epoch}.pth"), weights_only=True)[
        "student"
    ]


def assert_same_weights(a, b, atol=1e-5):
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=1e-4), key


def clean_env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_trainer(args, env, launcher=(), timeout=600):
    script = os.path.join(REPO, "distill_trainer.py")
    cmd = [*launcher, script] if launcher else [sys.executable, script]
    return subprocess.run(
        [*cmd, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, synthetic_root):
    run_dir = str(tmp_path_factory.mktemp("single") / "run")
    result = run_trainer(
        [
            "--override",
            *tiny_overrides(synthetic_root, run_dir, **EXTRA, **{"train.batch_size": 16}),
        ],
        clean_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path, synthetic_root, single_process_run):
    run_dir = str(tmp_path / "ddp")
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
    ]
    result = run_trainer(
        [
            "--override",
            *tiny_overrides(synthetic_root, run_dir, **EXTRA, **{"train.batch_size": 8}),
        ],
        clean_env(),
        launcher=torchrun,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(final_student(single_process_run), final_student(run_dir))
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    assert [r["epoch"] for r in log] == [0, 1, 2]  # rank 0 alone writes the log


def wait_for_training(run_dir, proc, timeout=120):
    """Returns once the trainer has logged its epoch-0 diagnostics, i.e. it is inside the first
    epoch."""
    deadline = time.time() + timeout
    path = os.path.join(run_dir, "log.jsonl")
    while time.time() < deadline:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("trainer did not start")


@pytest.fixture(scope="module")
def long_epoch_root(tmp_path_factory):
    return make_long_epoch_root(tmp_path_factory.mktemp("long"))


LONG = LONG_EPOCH


def test_first_slurm_host():
    assert first_slurm_host("gpu[012-015,020],login1") == "gpu012"
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("a-b[3,5]") == "a-b3"


def test_half_set_environment_is_an_error(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="half set"):
        detect_launcher()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert detect_launcher() == "single"  # sbatch without srun: one process


@pytest.mark.parametrize(
    "script", ["train.sbatch", "eval.sbatch", "gpu_checks.sh", "local_slurm.sh", "site_env.sh"]
)
def test_sbatch_scripts_parse(script):
    result = subprocess.run(
        ["bash", "-n", os.path.join(REPO, "scripts", script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------- issue 13: one run per directory, Ctrl-C
def start_trainer(args, cwd):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "distill_trainer.py"), *args],
        env=clean_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def user_lines(stderr):
    """stderr without warnings (the random teacher announces itself), which are one line each."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and all(
        not line.startswith((" ", "\t")) for line in lines
    ), stderr[-3000:]
    return [line for line in lines if not line.startswith("warning: ")]


def snapshot(folder):
    return {
        name: (
            os.stat(os.path.join(folder, name)).st_size,
            os.stat(os.path.join(folder, name)).st_mtime_ns,
        )
        for name in os.listdir(folder)
    }


@pytest.mark.slow
def test_second_trainer_on_the_same_run_dir_is_refused(tmp_path, long_epoch_root):
    """Two trainers on one checkpoint_dir would mix their log lines and weights: the second stops
    with one line naming the directory and the first one's PID and host, touching nothing; the first
    goes on (item 3)."""
    run_dir = str(tmp_path / "run")
    args = ["--override", *tiny_overrides(long_epoch_root, run_dir, **LONG)]
    first = start_trainer(args, tmp_path)
    try:
        wait_for_training(run_dir, first)
        first.send_signal(signal.SIGSTOP)  # holds its lock, writes nothing meanwhile
        before = snapshot(run_dir)
        second = subprocess.run(
            [sys.executable, os.path.join(REPO, "distill_trainer.py"), *args],
            env=clean_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert snapshot(run_dir) == before
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = user_lines(second.stderr)
    assert line.startswith(
        f"error: train.checkpoint_dir {run_dir} is in use by another trainer (pid {first.pid} on "
        f"{socket.gethostname()} since "
    ), line
    assert line.endswith("); wait for it to end, or use another train.checkpoint_dir"), line
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert [json.loads(line)["epoch"] for line in open(os.path.join(run_dir, "log.jsonl"))] == [
        0,
        1,
    ]
    assert not os.path.exists(os.path.join(run_dir, ".lock"))


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130_twice_exits_at_once(tmp_path, long_epoch_root):
    """Ctrl-C finishes the step, saves checkpoint_latest.pth and exits 130 with one line; the rerun
    resumes there, and two Ctrl-C in a row end it at once, again in one line (item 7)."""
    run_dir = str(tmp_path / "run")
    args = ["--override", *tiny_overrides(long_epoch_root, run_dir, **LONG)]
    proc = start_trainer(args, tmp_path)
    wait_for_training(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    latest = torch.load(os.path.join(run_dir, "checkpoint_latest.pth"), weights_only=True)
    assert proc.returncode == 130, err[-3000:]
    assert user_lines(err) == [
        f"interrupted (Ctrl-C): saved {run_dir}/checkpoint_latest.pth at epoch 1, step "
        f"{latest['step_in_epoch']}; rerun the same command to resume"
    ]
    assert latest["epoch"] == 0 and 0 < latest["step_in_epoch"] < 100

    proc = start_trainer(args, tmp_path)
    deadline = time.time() + 120
    while "resumed from" not in (proc.stdout.readline() or "") and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    (line,) = user_lines(err)
    assert line.startswith(
        ("interrupted twice (Ctrl-C): stopped at once", "interrupted (Ctrl-C): saved")
    ), line
    assert (
        torch.load(os.path.join(run_dir, "checkpoint_latest.pth"), weights_only=True)["global_step"]
        >= latest["global_step"]
    )
