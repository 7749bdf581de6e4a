"""The experiment grid as SLURM jobs, and the site settings every submission reads.

Launch:
    python run_experiments.py --arms kd supervised --seeds 0 1 2 --slurm   # arm x seed jobs, report
    python run_experiments.py --arms kd supervised --seeds 0 1 2 --slurm \
        --slurm_partition gpu --slurm_time 4:00:00
    python slurm_grid.py scripts/train.sbatch --override train.num_epochs=3  # one job, site.env

Site settings (docs/cluster.md): KD_* lines in site.env (or the file KD_SITE names), overridden by
KD_* environment variables, overridden by the --slurm_* flags. The wrappers source the same file
inside the job (scripts/site_env.sh).

Each grid job runs scripts/train.sbatch with run_experiments.py --slurm_task ARM:SEED: it trains
its arm (requeued and resumed on preemption like any training job), evaluates it and writes
<run dir>/grid_result.json. The report job (--slurm_report, afterany on them) writes
report.md/json/png from those files; an arm without one is listed as failed with its log.
Rerunning --slurm submits only the arms without grid_result.json, and refuses while a job of the
same grid (same --out_dir) is queued or running.
"""
from __future__ import annotations

import argparse
import difflib
import glob
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from checkpoint import atomic_write
from config import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_WRAPPER = os.path.join(HERE, "scripts", "train.sbatch")
SITE_DEFAULTS = {
    "KD_PARTITION": "",  # --partition; empty: the cluster's default
    "KD_ACCOUNT": "",  # --account
    # gpus-per-node (--gpus-per-node=N) | gres (--gres=gpu:N) | none (CPU)
    "KD_GPU_REQUEST": "gpus-per-node",
    "KD_GPUS_PER_JOB": "1",  # GPUs of one grid job (one task: the grid trains on one GPU per job)
    "KD_MEM_PER_GPU": "",  # e.g. 64G: host memory per GPU; empty: the cluster's default
    "KD_CPUS_PER_TASK": "8",
    "KD_TIME": "",  # time limit of a grid job (HH:MM:SS); empty: the wrapper's 02:00:00
    "KD_SBATCH_OPTIONS": "",  # any other sbatch options, e.g. "--qos=normal --constraint=a100"
    # shell run in the job before Python: module load, source venv/bin/activate, conda activate
    "KD_SETUP": "",
}
OTHER_KEYS = ("KD_SITE", "KD_SCRIPT", "KD_REPO")  # read by the wrappers, not site settings
GPU_REQUESTS = ("gpus-per-node", "gres", "none")
RESULT_FILE = "grid_result.json"
GRID_FILE = "slurm_grid.json"


# ----------------------------------------------------------------- site settings
def read_site_file(path: str) -> Dict[str, str]:
    """The KD_* values of a site file, evaluated by bash as the wrappers source it (quotes,
    $HOME, comments)."""
    script = (
        'set -a; . "$1" >/dev/null || exit 3; for k in ${!KD_@}; do printf "%s=%s\\0" "$k" "${!k}";'
        " done"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KD_")}
    result = subprocess.run(
        ["bash", "-c", script, "site", path], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise UserError(
            f"site file {path} failed in bash ({result.stderr.strip() or result.returncode});"
            " fix it"
        )
    values = dict(item.split("=", 1) for item in result.stdout.split("\0") if item)
    for key in values:
        if key not in SITE_DEFAULTS and key not in OTHER_KEYS:
            close = difflib.get_close_matches(key, SITE_DEFAULTS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(
                f"site file {path}: unknown setting {key}{hint}; known: {', '.join(SITE_DEFAULTS)}"
            )
    return values


def site_settings(
    path: Optional[str] = None, flags: Optional[Dict[str, Optional[str]]] = None
) -> Dict[str, str]:
    """Defaults < the site file (path, else $KD_SITE, else ./site.env if present) < KD_*
    environment < flags."""
    explicit = path or os.environ.get("KD_SITE")
    path = explicit or "site.env"
    values = dict(SITE_DEFAULTS)
    if os.path.isfile(path):
        values.update({k: v for k, v in read_site_file(path).items() if k in SITE_DEFAULTS})
    elif explicit:
        raise UserError(
            f"site file {path} not found (from {os.getcwd()}); fix --slurm_site / KD_SITE"
        )
    values.update({k: os.environ[k] for k in SITE_DEFAULTS if k in os.environ})
    values.update({k: str(v) for k, v in (flags or {}).items() if v is not None})
    if values["KD_GPU_REQUEST"] not in GPU_REQUESTS:
        raise UserError(
            f"KD_GPU_REQUEST={values['KD_GPU_REQUEST']}: expected one of {', '.join(GPU_REQUESTS)} "
            f"(site file {path} or the environment)"
        )
    for key in ("KD_GPUS_PER_JOB", "KD_CPUS_PER_TASK"):
        if not values[key].isdigit() or int(values[key]) < 1:
            raise UserError(
                f"{key}={values[key]}: expected a whole number >= 1 (site file {path} or flags)"
            )
    if values["KD_MEM_PER_GPU"] and not re.fullmatch(r"\d+[KMGT]?", values["KD_MEM_PER_GPU"]):
        raise UserError(
            f"KD_MEM_PER_GPU={values['KD_MEM_PER_GPU']}: expected e.g. 64G (site file {path})"
        )
    return values


def resource_options(site: Dict[str, str]) -> List[str]:
    """The sbatch options of the site: partition, account, GPUs in the site's style, memory,
    time, extras."""
    opts = [f"--cpus-per-task={site['KD_CPUS_PER_TASK']}"]
    opts += [f"--partition={site['KD_PARTITION']}"] if site["KD_PARTITION"] else []
    opts += [f"--account={site['KD_ACCOUNT']}"] if site["KD_ACCOUNT"] else []
    opts += [f"--time={site['KD_TIME']}"] if site["KD_TIME"] else []
    gpus, style, mem = int(site["KD_GPUS_PER_JOB"]), site["KD_GPU_REQUEST"], site["KD_MEM_PER_GPU"]
    if style == "gpus-per-node":
        opts += [f"--gpus-per-node={gpus}"] + ([f"--mem-per-gpu={mem}"] if mem else [])
    elif style == "gres":  # --mem-per-gpu needs --gpus*: the node memory instead
        number, unit = re.fullmatch(r"(\d+)([KMGT]?)", mem).groups() if mem else ("", "")
        opts += [f"--gres=gpu:{gpus}"] + ([f"--mem={int(number) * gpus}{unit}"] if mem else [])
    return opts + shlex.split(site["KD_SBATCH_OPTIONS"])


def sbatch(
    options: List[str], script: str, args: List[str], env: Optional[Dict[str, str]] = None
) -> str:
    """Submits; returns the job id. A refusal by sbatch is one line naming the options it got."""
    cmd = ["sbatch", "--parsable", *options, script, *args]
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
        )
    except FileNotFoundError:
        raise UserError(
            "sbatch not found: run this on a SLURM login node (or start scripts/local_slurm.sh)"
        ) from None
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise UserError(
            f"sbatch refused the job ({message}); options were: {' '.join(options)} (set them in "
            "site.env, KD_* variables or the --slurm_* flags: docs/cluster.md)"
        )
    return result.stdout.strip().split(";")[0]


# ----------------------------------------------------------------- the grid
def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLURM grid (docs/cluster.md)")
    g.add_argument(
        "--slurm",
        action="store_true",
        help=(
            "submit a job per arm x seed and a report job instead of running here; returns at once"
        ),
    )
    g.add_argument(
        "--slurm_site", default=None, help="site settings file (default: $KD_SITE, else ./site.env)"
    )
    g.add_argument("--slurm_partition", default=None)
    g.add_argument("--slurm_account", default=None)
    g.add_argument("--slurm_gpus", type=int, default=None, help="GPUs per job (KD_GPUS_PER_JOB)")
    g.add_argument("--slurm_time", default=None, help="time limit per job, e.g. 04:00:00")
    g.add_argument("--slurm_options", default=None, help='more sbatch options, e.g. "--qos=high"')
    g.add_argument(
        "--slurm_task", default=None, help=argparse.SUPPRESS
    )  # ARM:SEED, inside a grid job
    g.add_argument(
        "--slurm_report", action="store_true", help=argparse.SUPPRESS
    )  # inside the report job


def job_argv(argv: List[str]) -> List[str]:
    """run_experiments.py's own arguments without the grid flags (all named --slurm*)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token.startswith("--slurm"):
            skip = "=" not in token and token != "--slurm" and token != "--slurm_report"
        else:
            out.append(token)
    return out


def grid_prefix(out_dir: str) -> str:
    """Job names of one grid: kd-<hash of the absolute out_dir>-..., so reruns find their own
    jobs."""
    return "kd-" + hashlib.sha1(os.path.abspath(out_dir).encode()).hexdigest()[:8]


def active_jobs(prefix: str) -> List[str]:
    result = subprocess.run(
        ["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise UserError(
            f"squeue failed ({' '.join(result.stderr.split())}); is SLURM reachable from here?"
        )
    return [line for line in result.stdout.splitlines() if line.split()[1].startswith(prefix + "-")]


def result_path(plan: Dict[str, Any]) -> str:
    return os.path.join(plan["dir"], RESULT_FILE)


def write_result(path: str, result: Dict[str, Any]) -> None:
    """JSON, with the probes' int16 test predictions (numpy) stored exactly, dtype and all."""

    def encode(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"{type(obj).__name__} in a grid result")

    atomic_write(path, lambda f: f.write(json.dumps(result, default=encode).encode()))


def read_result(path: str) -> Dict[str, Any]:
    def decode(obj: Dict[str, Any]) -> Any:
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        return obj

    with open(path) as f:
        return json.load(f, object_hook=decode)


def submit_grid(plans: List[Dict[str, Any]], args: argparse.Namespace, argv: List[str]) -> int:
    prefix, out_dir = grid_prefix(args.out_dir), os.path.abspath(args.out_dir)
    active = active_jobs(prefix)
    if active:
        raise UserError(
            f"the grid in {out_dir} still has jobs queued or running ({'; '.join(active)}); wait"
            " for them (squeue -u $USER) or scancel them, then rerun to submit what is unfinished"
        )
    site = site_settings(
        args.slurm_site,
        {
            "KD_PARTITION": args.slurm_partition,
            "KD_ACCOUNT": args.slurm_account,
            "KD_GPUS_PER_JOB": args.slurm_gpus,
            "KD_TIME": args.slurm_time,
            "KD_SBATCH_OPTIONS": args.slurm_options,
        },
    )
    if int(site["KD_GPUS_PER_JOB"]) > 1:
        raise UserError(
            f"KD_GPUS_PER_JOB={site['KD_GPUS_PER_JOB']}: a grid job trains its arm as one task on"
            " one GPU; use 1 (the arms run side by side instead)"
        )
    logs = os.path.join(out_dir, "slurm")
    os.makedirs(logs, exist_ok=True)  # SLURM opens --output before the job starts
    env = {"KD_SCRIPT": os.path.join(HERE, "run_experiments.py"), "KD_REPO": HERE}
    base = job_argv(argv)
    jobs, teacher_jobs = {}, {}
    for plan in plans:
        key = f"{plan['arm']}:{plan['seed']}"
        if os.path.isfile(result_path(plan)):
            print(
                f"[{plan['arm']} seed {plan['seed']}] finished ({result_path(plan)}): not submitted"
            )
            continue
        name = f"{prefix}-{plan['arm']}-s{plan['seed']}"
        # A KD arm reads its teacher arm's final checkpoint: it starts when that job ended well.
        teacher = teacher_jobs.get(plan["seed"]) if plan["arm"] != args.teacher_from_arm else None
        depend = (
            [f"--dependency=afterok:{teacher}"]
            if teacher and plan["cfg"].train.objective == "distill"
            else []
        )
        job = sbatch(
            [f"--job-name={name}", f"--output={logs}/%x-%j.out", *resource_options(site), *depend],
            TRAIN_WRAPPER,
            [*base, "--slurm_task", key],
            env,
        )
        jobs[key] = {"job": job, "log": os.path.join(logs, f"{name}-{job}.out")}
        if plan["arm"] == args.teacher_from_arm:
            teacher_jobs[plan["seed"]] = job
    depend = [f"--dependency=afterany:{':'.join(j['job'] for j in jobs.values())}"] if jobs else []
    report = sbatch(
        [
            f"--job-name={prefix}-report",
            f"--output={logs}/%x-%j.out",
            *resource_options(site),
            *depend,
        ],
        TRAIN_WRAPPER,
        [*base, "--slurm_report"],
        env,
    )
    previous = read_grid_file(out_dir).get("jobs", {})
    record = {
        "jobs": {**previous, **jobs},
        "report": {"job": report, "log": os.path.join(logs, f"{prefix}-report-{report}.out")},
    }
    atomic_write(
        os.path.join(out_dir, GRID_FILE), lambda f: f.write(json.dumps(record, indent=1).encode())
    )
    for key, j in jobs.items():
        print(f"submitted {key.replace(':', ' seed ')}: job {j['job']}, log {j['log']}")
    print(
        f"submitted the report: job {report} (after {len(jobs)} jobs), writes {out_dir}/report.md;"
        f" log {record['report']['log']}"
    )
    names = [f"{prefix}-{k.replace(':', '-s')}" for k in jobs] + [f"{prefix}-report"]
    print(f"follow: squeue -u $USER -n {','.join(names)}")
    return 0


def read_grid_file(out_dir: str) -> Dict[str, Any]:
    path = os.path.join(out_dir, GRID_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------- inside the jobs
@dataclass(frozen=True)
class Suite:
    """What a grid job runs of the in-process suite (run_experiments.py passes its functions: the
    job does exactly what the in-process run does, and this module imports nothing of it)."""
    train_arm: Callable
    evaluate_arms: Callable
    base_config: Callable
    write_report: Callable


def run_task(plans: List[Dict[str, Any]], args: argparse.Namespace, rx: Suite) -> int:
    """One arm x seed: train (resuming after a requeue), evaluate, write grid_result.json last."""
    arm, _, seed = args.slurm_task.partition(":")
    plan = next((p for p in plans if p["arm"] == arm and str(p["seed"]) == seed), None)
    if plan is None:
        raise UserError(f"--slurm_task {args.slurm_task}: no such arm and seed in this grid")
    rx.train_arm(plan)
    (result,) = rx.evaluate_arms(plans, args, rx.base_config(args), only=[plan], legacy=False)
    write_result(result_path(plan), result)
    print(f"[{arm} seed {seed}] done: {result_path(plan)}", flush=True)
    return 0


def run_report(plans: List[Dict[str, Any]], args: argparse.Namespace, rx: Suite) -> int:
    """The report of every arm with a grid_result.json; the others are listed as failed, with
    their logs."""
    logs = read_grid_file(args.out_dir).get("jobs", {})
    done, results, failed = [], [], []
    for plan in plans:
        path = result_path(plan)
        if os.path.isfile(path):
            results.append(read_result(path))
            done.append(plan)
        else:
            log = (logs.get(f"{plan['arm']}:{plan['seed']}") or {}).get(
                "log"
            ) or "no job was submitted"
            failed.append((plan, log))
    if not done:
        raise UserError(
            f"no arm of the grid finished; see the logs: {', '.join(log for _, log in failed)}"
        )
    base = rx.base_config(args)
    args.eval_data_description = f"{base.data.dataset_name} {base.data.dataset_root}"
    results += rx.evaluate_arms(plans, args, base, only=[])  # the legacy runs, if any
    text = rx.write_report(done, results, args)
    if failed:
        text = add_failures(args.out_dir, text, failed, plans)
    print("\n" + text, flush=True)
    return 0


def add_failures(out_dir: str, text: str, failed, plans) -> str:
    """Names each failed arm x seed at the top of the verdict, with its log and what its absence
    means."""
    lines = []
    for plan, log in failed:
        arm = plan["arm"]
        total = sum(1 for p in plans if p["arm"] == arm)
        left = total - sum(1 for p, _ in failed if p["arm"] == arm)
        meaning = (
            f"{arm} is absent from every table and comparison above"
            if left == 0
            else f"{arm}'s rows and intervals rest on {left} of its {total} seeds"
        )
        lines.append(f"- FAILED: {arm} seed {plan['seed']} (log: {log}): {meaning}.")
    text = text.replace("## Verdict\n\n", "## Verdict\n\n" + "\n".join(lines) + "\n", 1)
    atomic_write(os.path.join(out_dir, "report.md"), lambda f: f.write(text.encode()))
    path = os.path.join(out_dir, "report.json")
    with open(path) as f:
        data = json.load(f)
    data["failed"] = [{"arm": p["arm"], "seed": p["seed"], "log": log} for p, log in failed]
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))
    return text


def main(plans: List[Dict[str, Any]], args: argparse.Namespace, argv: List[str], suite: Suite
         ) -> int:
    """run_experiments.py's --slurm, --slurm_task and --slurm_report."""
    if args.slurm_task:
        return run_task(plans, args, suite)
    if args.slurm_report:
        return run_report(plans, args, suite)
    return submit_grid(plans, args, argv)


def submit_one(argv: List[str]) -> int:
    """python slurm_grid.py SCRIPT ARGS: sbatch SCRIPT with the site's resources; prints the job
    id."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        job = sbatch(resource_options(site_settings()), argv[0], argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(job)
    return 0


if __name__ == "__main__":
    sys.exit(submit_one(sys.argv[1:]))
