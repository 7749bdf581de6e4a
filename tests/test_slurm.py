"""The SLURM wrappers on a real one-node cluster (scripts/local_slurm.sh): sbatch, preemption and
requeue, srun ranks, evaluation and the experiment grid, each a tiny CPU run compared with the same
run made directly.

Needs slurm-wlm and munge (apt-get install -y slurm-wlm munge) and root; skipped otherwise, failed
with CI=true."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import distill_trainer
import slurm_grid
from config import UserError

from helpers import (LONG_EPOCH, REPO, make_long_epoch_root, symlinked_checkout,
                     tiny_overrides)

LOCAL_SLURM = os.path.join(REPO, "scripts", "local_slurm.sh")
ENABLE = (
    "SLURM tests skipped: install slurm-wlm and munge (apt-get install -y slurm-wlm munge) and run"
    " pytest as root to run them on a local cluster (scripts/local_slurm.sh)"
)
EXTRA = {"train.num_epochs": 2, "train.save_epochs": [2], "data.num_workers": 0}
LONG = {**LONG_EPOCH, "data.num_workers": 0}
DONE = (
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE",
)


def clean_env(**extra):
    """This process's environment without launcher variables, the job's python first on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("SLURM_", "SBATCH_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "KD_")
        )
    }
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}",
        **extra,
    )
    return env


class Cluster:
    def __init__(self, conf: str):
        # The node has no GPU GRES and 2 CPUs: the site settings of a CPU cluster (docs/cluster.md).
        self.env = clean_env(SLURM_CONF=conf, KD_GPU_REQUEST="none", KD_CPUS_PER_TASK="1")

    def run(self, *cmd, **kw):
        return subprocess.run(
            cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60, **kw
        )

    def sbatch(self, cwd, *args, **env) -> str:
        result = self.run(
            "sbatch", "--parsable", "--cpus-per-task=1", *args, cwd=cwd, env={**self.env, **env}
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: str, until=DONE, timeout=300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            assert job, f"no job {job_id}"
            if job.get("JobState") in until:
                return job
            time.sleep(0.3)
        job, nodes = self.job(job_id), self.run("sinfo", "-N", "-o", "%N %t %C %E").stdout
        raise AssertionError(
            f"job {job_id} still {job.get('JobState')} ({job.get('Reason')}) after {timeout} s; "
            f"nodes: {nodes}"
        )

    def wait_restarted(self, job_id: str, restarts: int, timeout=300) -> None:
        """A requeued job waits for its begin time (SLURM delays it); release it 2 s after the
        requeue."""
        deadline = time.time() + timeout
        while True:
            job = self.job(job_id)
            if int(job.get("Restarts", 0)) >= restarts:
                break
            assert (
                time.time() < deadline and job.get("JobState") not in DONE
            ), f"job {job_id} not requeued: {job}"
            time.sleep(0.3)
        # A launch in the same second as the kill reuses a revoked credential: slurmd refuses it
        # ("already killed, do not launch batch job"). SLURM's own begin delay exists for that.
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


@pytest.fixture(scope="session")
def cluster():
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]
    reason = (
        f"{ENABLE} ({', '.join(missing)} not found)"
        if missing
        else (f"{ENABLE} (not root)" if os.geteuid() != 0 else None)
    )
    ci = os.environ.get("CI") == "true"
    if reason:
        (pytest.fail if ci else pytest.skip)(reason)
    # Not under pytest's basetemp: the munge socket path must stay short (Unix sockets: 108 bytes).
    state = tempfile.mkdtemp(prefix="local-slurm-")
    env = {**os.environ, "LOCAL_SLURM_DIR": state}
    started = subprocess.run(
        ["bash", LOCAL_SLURM, "start"], env=env, capture_output=True, text=True, timeout=120
    )
    if started.returncode != 0:
        (pytest.fail if ci else pytest.skip)(f"local SLURM did not start: {started.stderr.strip()}")
    try:
        yield Cluster(os.path.join(state, "slurm.conf"))
    finally:
        subprocess.run(["bash", LOCAL_SLURM, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def submit(tmp_path_factory):
    """The folder jobs are submitted from: the scripts' relative paths and logs/ resolve there, not
    in the repo."""
    folder = symlinked_checkout(tmp_path_factory.mktemp("submit") / "checkout")
    os.makedirs(
        os.path.join(folder, "logs")
    )  # SLURM opens --output before the script runs (docs/cluster.md)
    return folder


def run_trainer(args, env, launcher=()):
    cmd = (
        [*launcher, os.path.join(REPO, "distill_trainer.py")]
        if launcher
        else [sys.executable, os.path.join(REPO, "distill_trainer.py")]
    )
    result = subprocess.run(
        [*cmd, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def student(run_dir, epoch):
    return torch.load(os.path.join(run_dir, f"checkpoint_epoch_{epoch}.pth"), weights_only=True)[
        "student"
    ]


def assert_equal_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def job_log(submit_dir, name, job_id):
    with open(os.path.join(submit_dir, "logs", f"{name}-{job_id}.out")) as f:
        return f.read()


def assert_completed(job, log):
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, log[-3000:])


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory, synthetic_root):
    run_dir = str(tmp_path_factory.mktemp("direct") / "run")
    run_trainer(["--override", *tiny_overrides(synthetic_root, run_dir, **EXTRA)], clean_env())
    return run_dir


# -------------------------------------------------- item 1: sbatch runs to completion
@pytest.mark.slow
def test_sbatch_train_equals_direct_run(cluster, submit, synthetic_root, direct_run, tmp_path):
    run_dir = str(tmp_path / "run")
    job = cluster.sbatch(
        submit,
        "scripts/train.sbatch",
        "--override",
        *tiny_overrides(synthetic_root, run_dir, **EXTRA),
    )
    state = cluster.wait(job)
    log = job_log(submit, "kd-train", job)
    assert_completed(state, log)
    assert f"job {job} on " in log and "restart 0" in log and "requeueing" not in log
    assert_equal_weights(student(direct_run, 2), student(run_dir, 2))


# -------------------------------------------------- item 2: preemption -> 75 -> requeue -> resume
@pytest.fixture(scope="module")
def long_root(tmp_path_factory):
    return make_long_epoch_root(tmp_path_factory.mktemp("long"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, long_root):
    run_dir = str(tmp_path_factory.mktemp("straight") / "run")
    run_trainer(["--override", *tiny_overrides(long_root, run_dir, **LONG)], clean_env())
    return run_dir


def wait_for_log(cluster, submit_dir, job, text, timeout=300):
    deadline = time.time() + timeout
    path = os.path.join(submit_dir, "logs", f"kd-train-{job}.out")
    while not (os.path.exists(path) and text in open(path).read()):
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), cluster.job(job)
        assert time.time() < deadline, f"{text!r} did not appear in {path}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("no_resume", [False, True], ids=["resume", "no_resume"])
def test_usr1_checkpoints_requeues_and_resumes_exactly(
    cluster, submit, long_root, straight_run, tmp_path, no_resume
):
    """USR1 to the batch shell -> save, exit 75 -> scontrol requeue -> the restarted job resumes,
    also when it was submitted with --no_resume (only a job's first start may start fresh: there it
    moves an older run aside)."""
    run_dir = str(tmp_path / "run")
    if no_resume:  # an older run in the folder, which the job's first start moves aside
        shutil.copytree(straight_run, run_dir)
    args = [
        *(["--no_resume"] if no_resume else []),
        "--override",
        *tiny_overrides(long_root, run_dir, **LONG),
    ]
    job = cluster.sbatch(submit, "scripts/train.sbatch", *args)
    wait_for_log(
        cluster, submit, job, '"epoch": 0,'
    )  # the trainer logged epoch 0: it is inside the epoch
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    cluster.wait_restarted(job, 1)
    state = cluster.wait(job)
    log = job_log(submit, "kd-train", job)
    assert_completed(state, log)
    first, second = log.split("restart 1, args:")
    assert "exiting with 75 for requeue" in first and f"exit 75): requeueing job {job}" in first
    assert ("moved 4 earlier files to" in first) == no_resume
    assert "resumed from" in second and "moved" not in second
    assert (f"SLURM job {job} restarted (restart 1): resuming its own run" in second) == no_resume
    assert_equal_weights(student(straight_run, 1), student(run_dir, 1))


@pytest.mark.slow
def test_time_limit_signal_from_slurm_requeues_and_resumes(cluster, submit, long_root, tmp_path):
    """--time and --signal=B:USR1@N: SLURM itself signals the batch shell before the limit (it looks
    every 30 s and sends it up to 30 s early: here 30-60 s after the start, once training runs); the
    job requeues, and its restart resumes."""
    run_dir = str(tmp_path / "run")
    many = {**LONG, "train.num_epochs": 200, "train.save_epochs": [200], "train.warmup_epochs": 1}
    job = cluster.sbatch(
        submit, "--time=2", "--signal=B:USR1@60", "scripts/train.sbatch", "--no_resume",
        "--override",
        *tiny_overrides(long_root, run_dir, **many),
    )
    cluster.wait_restarted(job, 1, timeout=240)
    deadline = time.time() + 240
    while "resumed from" not in job_log(submit, "kd-train", job):
        assert time.time() < deadline and cluster.job(job)["JobState"] in (
            "PENDING",
            "RUNNING",
        ), cluster.job(job)
        time.sleep(0.3)
    cluster.run("scancel", job)
    log = job_log(submit, "kd-train", job)
    assert (
        "USR1 received" in log
        and "exiting with 75 for requeue" in log
        and "restart 1, args:" in log
    )
    assert (
        "moved" not in log
    )  # --no_resume: the first start found nothing to move, the restart resumed
    assert (
        torch.load(os.path.join(run_dir, "checkpoint_latest.pth"), weights_only=True)["global_step"]
        > 0
    )


# ----------------------------------------------------------------- item 3: srun ranks
@pytest.mark.slow
def test_two_srun_tasks_equal_torchrun_two_processes(cluster, submit, synthetic_root, tmp_path):
    """--ntasks-per-node=2: srun starts two trainers, which find each other from SLURM_PROCID/NTASKS
    (gloo) and train exactly as torchrun's two processes do; rank 0 alone writes."""
    per_rank = {**EXTRA, "train.batch_size": 8}
    reference = str(tmp_path / "torchrun")
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
    ]
    run_trainer(
        ["--override", *tiny_overrides(synthetic_root, reference, **per_rank)],
        clean_env(),
        launcher=torchrun,
    )
    run_dir = str(tmp_path / "srun")
    job = cluster.sbatch(
        submit, "--ntasks-per-node=2", "scripts/train.sbatch", "--override",
        *tiny_overrides(synthetic_root, run_dir, **per_rank),
    )
    state = cluster.wait(job)
    log = job_log(submit, "kd-train", job)
    assert_completed(state, log)
    assert log.count("global batch 16") == 1, log[-3000:]  # two ranks of 8, one of them printing
    assert [json.loads(line)["epoch"] for line in open(os.path.join(run_dir, "log.jsonl"))] == [
        0,
        1,
        2,
    ]
    assert_equal_weights(student(reference, 2), student(run_dir, 2))


# ----------------------------------------------------------------- item 4: evaluation
@pytest.mark.slow
def test_eval_sbatch_writes_the_evaluator_outputs(cluster, submit, direct_run, tmp_path):
    out_file = str(tmp_path / "eval.json")
    ckpt = torch.load(os.path.join(direct_run, "checkpoint_epoch_2.pth"), weights_only=True)
    model_cfg = tmp_path / "model.yaml"
    model_cfg.write_text(json.dumps(ckpt["config"]["model"]))  # JSON is YAML
    job = cluster.sbatch(
        submit, "scripts/eval.sbatch", "--checkpoint_dir", direct_run, "--epochs", "2", "--device",
        "cpu", "--output_file", out_file, "--model_config",
        str(model_cfg),
    )
    state = cluster.wait(job)
    assert_completed(state, job_log(submit, "kd-eval", job))
    assert [e["epoch"] for e in json.load(open(out_file))["entries"]] == [2]
    assert os.path.isfile(str(tmp_path / "eval.md")) and os.path.isfile(str(tmp_path / "eval.png"))


# ----------------------------------------------------------------- item 5: the experiment grid
def grid_argv(root, out_dir):
    overrides = [
        o
        for o in tiny_overrides(root, "unused", **EXTRA)
        if not o.startswith(("train.checkpoint_dir", "train.save_epochs"))
    ]
    return [
        os.path.join(REPO, "run_experiments.py"),
        "--arms", "kd", "supervised", "--seeds", "0", "1", "--epochs", "1", "2", "--device", "cpu",
        "--eval_batch_size", "64", "--out_dir", out_dir, "--override",
        *overrides,
    ]


@pytest.mark.slow
def test_grid_on_slurm_reports_what_the_in_process_suite_reports(
    cluster, submit, synthetic_root, tmp_path
):
    """2 arms x 2 seeds: --slurm returns at once with the job ids; a second --slurm while they run
    is refused; the report job's report equals the in-process suite's, number for number; a rerun
    submits only the report."""
    in_process = str(tmp_path / "in_process")
    done = subprocess.run(
        [sys.executable, *grid_argv(synthetic_root, in_process)],
        env=clean_env(),
        cwd=submit,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    grid = str(tmp_path / "grid")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sub = cluster.run(sys.executable, *grid_argv(synthetic_root, grid), "--slurm", cwd=submit)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert sub.returncode == 0, sub.stdout + sub.stderr[-3000:]
    # CPU seconds, not wall time: on a shared, loaded machine the wall clock measures the
    # neighbours.
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu < 10, cpu
    jobs = [
        line.split("job ")[1].split()[0].rstrip(",")
        for line in sub.stdout.splitlines()
        if line.startswith("submitted")
    ]
    assert len(jobs) == 5 and "squeue -u $USER -n " in sub.stdout, sub.stdout
    again = cluster.run(sys.executable, *grid_argv(synthetic_root, grid), "--slurm", cwd=submit)
    assert (
        again.returncode == 2 and "still has jobs queued or running" in again.stderr
    ), again.stderr
    state = cluster.wait(jobs[-1], timeout=600)
    report_log = open(
        json.load(open(os.path.join(grid, "slurm_grid.json")))["report"]["log"]
    ).read()
    assert_completed(state, report_log)
    for key in ("rows", "summary", "verdict"):
        assert (
            json.load(open(os.path.join(grid, "report.json")))[key]
            == json.load(open(os.path.join(in_process, "report.json")))[key]
        ), key
    inner = open(os.path.join(in_process, "report.md")).read().replace(in_process, "OUT")
    assert open(os.path.join(grid, "report.md")).read().replace(grid, "OUT") == inner

    rerun = cluster.run(sys.executable, *grid_argv(synthetic_root, grid), "--slurm", cwd=submit)
    assert rerun.returncode == 0 and rerun.stdout.count("not submitted") == 4, rerun.stdout
    cluster.wait(rerun.stdout.split("the report: job ")[1].split()[0], timeout=300)


# -------------------------------------------------- item 6: site settings (no cluster)
def test_site_file_flags_and_environment_in_order(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("KD_"):
            monkeypatch.delenv(key)
    site = tmp_path / "site.env"
    site.write_text('# a comment\nKD_PARTITION=gpu\nKD_GPU_REQUEST=gres\nKD_MEM_PER_GPU=32G\n'
                    'KD_SBATCH_OPTIONS="--qos=high --constraint=a100"\n'
                    'KD_SETUP="module load cuda"\n')
    values = slurm_grid.site_settings(str(site))
    assert values["KD_PARTITION"] == "gpu" and values["KD_SETUP"] == "module load cuda"
    assert slurm_grid.resource_options(values) == [
        "--cpus-per-task=8", "--partition=gpu", "--gres=gpu:1", "--mem=32G", "--qos=high",
        "--constraint=a100"]
    monkeypatch.setenv("KD_PARTITION", "short")  # the environment over the file, flags over both
    assert slurm_grid.site_settings(str(site))["KD_PARTITION"] == "short"
    flags = slurm_grid.site_settings(str(site), {"KD_PARTITION": "long", "KD_GPUS_PER_JOB": 2})
    assert "--partition=long" in slurm_grid.resource_options(flags)
    assert "--gres=gpu:2" in slurm_grid.resource_options(flags) and "--mem=64G" in \
        slurm_grid.resource_options(flags)
    monkeypatch.setenv("KD_GPU_REQUEST", "gpus-per-node")
    assert slurm_grid.resource_options(slurm_grid.site_settings(str(site)))[2:4] == [
        "--gpus-per-node=1", "--mem-per-gpu=32G"]
    monkeypatch.setenv("KD_GPU_REQUEST", "none")
    cpu = slurm_grid.resource_options(slurm_grid.site_settings(str(site)))
    assert not any("gpu" in o for o in cpu)


@pytest.mark.parametrize("text, message", [
    ("KD_PARTITON=gpu\n", "unknown setting KD_PARTITON (did you mean KD_PARTITION?)"),
    ("KD_GPU_REQUEST=gpus\n", "KD_GPU_REQUEST=gpus: expected one of gpus-per-node, gres, none"),
    ("KD_GPUS_PER_JOB=two\n", "KD_GPUS_PER_JOB=two: expected a whole number >= 1"),
    ("KD_MEM_PER_GPU=lots\n", "KD_MEM_PER_GPU=lots: expected e.g. 64G")])
def test_site_file_mistakes_are_one_line_naming_the_key(tmp_path, monkeypatch, text, message):
    for key in list(os.environ):
        if key.startswith("KD_"):
            monkeypatch.delenv(key)
    site = tmp_path / "site.env"
    site.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        slurm_grid.site_settings(str(site))
    with pytest.raises(UserError, match="not found"):
        slurm_grid.site_settings(str(tmp_path / "missing.env"))


def test_grid_jobs_get_the_arguments_without_the_grid_flags():
    argv = ["--arms", "kd", "--slurm", "--slurm_partition", "gpu", "--slurm_time=1:00:00",
            "--seeds", "0", "--slurm_options", "--qos=x", "--out_dir", "e"]
    assert slurm_grid.job_argv(argv) == ["--arms", "kd", "--seeds", "0", "--out_dir", "e"]


def test_requeued_job_is_recognised_only_for_its_own_run(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("train: {}\nmeta: {slurm_job_id: '42'}\n")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert distill_trainer.requeued_job(str(tmp_path)) is None  # the job's first start
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert distill_trainer.requeued_job(str(tmp_path)) == "42"
    monkeypatch.setenv("SLURM_JOB_ID", "43")  # another job: its --no_resume moves this run aside
    assert distill_trainer.requeued_job(str(tmp_path)) is None
