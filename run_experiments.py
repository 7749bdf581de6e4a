"""Answers the repo's question in one command: trains the experiment arms, probes them, writes a
report with a verdict.

Launch:
    python run_experiments.py                                   # every arm in configs/experiments/,
    epochs 1 10 20 50 python run_experiments.py --arms kd supervised --seeds 0 1 2  # every arm per
    seed, paired python run_experiments.py --arms supervised kd --teacher_from_arm supervised   # no
    DINOv2 weights at hand python run_experiments.py --arms kd supervised --seeds 0 1 2
    --transfer_root /data/other96px \
        --legacy_dir /path/to/old/run --legacy_cifar_dir /path/to/old/cifar_run   # P, D and L
    python run_experiments.py --arms kd --dry_run                # print each arm's trainer
    arguments (for sbatch)

Each arm is `configs/experiments/<arm>.yaml` (values on top of the three main configs; --override
wins over them), trained in this process into `<out_dir>/<arm>/` (with --seeds:
`<out_dir>/<arm>/seed<k>/`, train.seed = k; skipped when its final checkpoint exists: the command is
resumable), evaluated with evaluate_checkpoints.py on the base data section (CIFAR-10 for every arm,
the folder arms too; --transfer_match steps gives them kd's optimizer steps), and summarised in
`<out_dir>/report.md`, `report.png` and `report.json`. The untrained baseline is probed per seed,
each distinct teacher once per seed it differs in. The sentences come from verdict.py: paired
contrasts on per-image predictions (stats.compare_arms), the decision table of docs/experiments.md,
one Answer.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import shlex
import signal
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import yaml

import dinov2_patcher
import distill_loss
import distill_trainer
import distributed
import evaluate_checkpoints as ev
import metrics
import report
import slurm_grid
import stats
import verdict
from checkpoint import check_output_file, check_same_inputs, load_checkpoint, run_metadata
from config import (DEFAULT_FILES, SECTIONS, ArgumentParser, Config, DataConfig, UserError, dotted,
                    load_config, one_line_warnings, parse_override, read_yaml, replace_values)
from data_loader import load_split

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS_DIR = os.path.join(HERE, "configs", "experiments")
# its arm file sets data.dataset_name: folder; the folder is --transfer_root
TRANSFER_ARM = "kd_transfer"
LOWRES_ARM = "kd_transfer_lowres"  # the transfer folder stored at 32 px, then treated like CIFAR-10
LEGACY_FIGURE = (11.0, 13.0)  # % the earlier runs probed at on CIFAR-10: --legacy_figure's default


class Requeue(Exception):
    """The trainer saved and stopped on SIGUSR1/SIGTERM: exit with its requeue code; a rerun resumes
    the arm."""


class Stopped(BaseException):
    """SIGUSR1/SIGTERM outside training, raised at once by SuiteSignals; a BaseException, so no
    `except Exception` on the way swallows it. args: (message, exit code)."""


class SuiteSignals(distributed.HandledSignals):
    """SIGUSR1 (SLURM's pre-timeout signal) and SIGTERM stop the suite where it is, outside
    training too, with the requeue code 75 (the sbatch wrapper requeues). While an arm trains the
    trainer's own handler is installed instead (it saves and returns 75). What is finished is on
    disk: checkpoints, each probed arm's eval_results files (written atomically); the rerun skips
    finished arms. `phase` names what was interrupted."""
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.phase = "planning"

    def _handle(self, signum, frame) -> None:
        raise Stopped(f"stopped by {signal.Signals(signum).name} while {self.phase}",
                      distill_trainer.EXIT_REQUEUE)


# ----------------------------------------------------------------- arms
def available_arms() -> List[str]:
    return sorted(
        os.path.splitext(os.path.basename(p))[0]
        for p in glob.glob(os.path.join(ARMS_DIR, "*.yaml"))
    )


def arm_file(arm: str) -> str:
    path = os.path.join(ARMS_DIR, f"{arm}.yaml")
    if not os.path.isfile(path):
        raise UserError(f"--arms: unknown arm '{arm}'; available: {', '.join(available_arms())}")
    return path


def folder_arms() -> List[str]:
    """Arms whose file trains on the --transfer_root folder (data.dataset_name: folder)."""
    return [arm for arm in available_arms()
            if (read_yaml(arm_file(arm)).get("data") or {}).get("dataset_name") == "folder"]


def arm_list(args: argparse.Namespace) -> List[str]:
    """--arms in order, the teacher arm first; the folder arms need --transfer_root (kd_transfer is
    added by it); --teacher_from_arm must name an arm that does not itself distil from that
    teacher."""
    arms = list(dict.fromkeys(args.arms or available_arms()))
    if args.transfer_root and TRANSFER_ARM not in arms:
        arms.append(TRANSFER_ARM)
    for arm in [a for a in folder_arms() if a in arms and not args.transfer_root]:
        if args.arms:
            raise UserError(f"--arms {arm} trains on another dataset: pass --transfer_root DIR "
                            f"(a folder of images, e.g. the earlier 96 px training set)")
        arms.remove(arm)  # the default "every arm" means every arm that can run
    if args.teacher_from_arm:
        if args.teacher_from_arm not in arms:
            raise UserError(f"--teacher_from_arm {args.teacher_from_arm}: add it to --arms so it "
                            f"is trained first")
        arms.remove(args.teacher_from_arm)
        arms.insert(0, args.teacher_from_arm)
    return arms


def check_teacher_arm(plan: Dict[str, Any]) -> None:
    if plan["cfg"].train.objective == "distill":
        raise UserError(f"--teacher_from_arm {plan['arm']}: that arm distils from the teacher it "
                        f"would provide (train.objective distill); name an arm trained without a "
                        f"teacher, e.g. --teacher_from_arm supervised")


def steps_per_epoch(cfg: Config, num_images: int) -> int:
    """The trainer's optimizer steps per epoch (distill_trainer.build_run), at this process's world
    size."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    steps = num_images // (cfg.train.batch_size * world)
    return min(steps, cfg.train.max_steps_per_epoch or steps)


def train_images(data: DataConfig) -> int:
    """How many training images a data section yields (CIFAR without reading it)."""
    if data.dataset_name in ("cifar10", "cifar100"):
        return min(50000, data.max_samples or 50000)
    return len(load_split(data, "train")[1])


def step_match(cfg: Config, reference: Optional[Config]) -> Dict[str, Any]:
    """--transfer_match steps: a folder arm gets kd's optimizer steps per epoch, hence the same
    steps and warmup steps over the same epochs (warmup_epochs counts the arm's own steps)."""
    if reference is None:
        return {}
    return {"train.max_steps_per_epoch": steps_per_epoch(reference, train_images(reference.data))}


def plan_arms(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Each (seed, arm)'s validated config; per seed the teacher arm first, whose final student is
    then the teacher of that seed's KD arms when --teacher_from_arm is used.

    Values by precedence, lowest first: the three config files, the arm's file ({section: {key:
    value}}), --override, and what this script sets (checkpoint_dir, save_epochs from --epochs, the
    seed, the transfer folder, the arm teacher).
    """
    arms = arm_list(args)
    files = {arm: arm_file(arm) for arm in arms}
    base = base_config(args)
    user = dotted(
        {f"{section}.{key}": value for section, key, value in map(parse_override, args.override)}
    )
    plans: List[Dict[str, Any]] = []
    match = None  # the kd arm's config, which the folder arms are step-matched to
    folder = folder_arms()
    order = [a for a in arms if a not in folder] + [a for a in arms if a in folder]  # after kd
    for seed in args.seeds or [None]:
        teacher_plan = None
        for arm in order:
            arm_values = read_yaml(files[arm])
            arm_data = dict(arm_values.get("data") or {})
            if arm_data.get("dataset_name") == "folder":
                # The folder keys are valid only with the folder itself: set with it, after
                # --override.
                arm_values = {**arm_values, "data": {k: v for k, v in arm_data.items()
                                                     if k not in ("dataset_name", "source_size")}}
            cfg = replace_values(base, arm_values, files[arm])
            # over the arm's values
            cfg = replace_values(cfg, user, f"--override {' '.join(args.override)}")
            final = cfg.train.num_epochs
            if any(e > final or e < 1 for e in args.epochs):
                raise UserError(
                    f"--epochs {args.epochs}: every epoch must lie in 1..train.num_epochs={final}"
                )
            run_dir = os.path.join(args.out_dir, arm, *([] if seed is None else [f"seed{seed}"]))
            own = {
                "train.checkpoint_dir": run_dir,
                "train.save_epochs": sorted(set(args.epochs) | {final}),
            }
            if seed is not None:
                own["train.seed"] = seed
            if arm_data.get("dataset_name") == "folder":
                own.update({"data.dataset_name": "folder",
                            "data.dataset_root": os.path.abspath(args.transfer_root),
                            "data.source_size": arm_data.get("source_size",
                                                             args.transfer_source_size)})
                if args.transfer_match == "steps":
                    own.update(step_match(cfg, match))
            if teacher_plan is not None and cfg.train.objective == "distill":
                # The finished supervised student becomes the frozen teacher, at its own input size
                # (6x6 grid -> 6x6).
                own.update({"model.teacher_weights": teacher_plan["final_path"],
                            "model.teacher_name": teacher_plan["cfg"].model.student_name,
                            "model.teacher_img_size": teacher_plan["cfg"].model.student_img_size})
            cfg = replace_values(cfg, dotted(own), "run_experiments.py")
            plan = {
                "arm": arm,
                "seed": cfg.train.seed,
                "cfg": cfg,
                "dir": cfg.train.checkpoint_dir,
                "final_path": os.path.join(
                    cfg.train.checkpoint_dir, f"checkpoint_epoch_{final}.pth"
                ),
            }
            if arm == args.teacher_from_arm:
                check_teacher_arm(plan)
                teacher_plan = plan
            if arm == "kd":
                match = cfg
            plans.append(plan)
    return plans


def base_config(args: argparse.Namespace) -> Config:
    """The three files with --override: its data section is what every arm is probed on."""
    # save_epochs is set from --epochs last; [1] keeps every layer below valid whatever num_epochs
    # it sets.
    return load_config(args.data_config, args.train_config, args.model_config,
                       args.override + ["train.save_epochs=[1]"])


def trainer_arguments(cfg: Config, args: argparse.Namespace) -> str:
    """distill_trainer.py arguments giving `cfg`, for sbatch: the three files, an --override per
    changed value."""
    paths = {"data": args.data_config, "train": args.train_config, "model": args.model_config}
    files = {
        s: {**dataclasses.asdict(SECTIONS[s]()), **read_yaml(path)} for s, path in paths.items()
    }
    argv = [
        "--data_config", args.data_config, "--train_config", args.train_config, "--model_config",
        args.model_config, "--override",
    ]
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            # YAML text that --override reads back as the same value
            if value != files[section][key]:
                text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).replace(
                    "\n...\n", ""
                )
                argv.append(f"{section}.{key}={text.strip()}")
    return " ".join(map(shlex.quote, argv))


# ----------------------------------------------------------------- training
def check_outputs(plans: List[Dict[str, Any]], args: argparse.Namespace) -> None:
    """Every file the evaluation and the report will write, checked before the first arm trains."""
    check_output_file("--out_dir", os.path.join(args.out_dir, "report.json"))
    for plan in plans:
        results = os.path.join(plan["dir"], "eval_results.json")
        check_output_file("--out_dir", results, also=[ev.predictions_path(results)])
    for arm, directory in (("legacy", args.legacy_dir), ("legacy_cifar", args.legacy_cifar_dir)):
        if directory:
            check_output_file("--out_dir", os.path.join(args.out_dir, f"{arm}_eval_results.json"))


def train_arm(plan: Dict[str, Any]) -> None:
    """Trains one arm unless its final checkpoint exists and was trained with this very config."""
    name = f"{plan['arm']} seed {plan['seed']}"
    if os.path.isfile(plan["final_path"]):
        # Reused only when a resume would accept it: the same config up to config.HARMLESS_KEYS,
        # the same data, the same teacher.
        ckpt = load_checkpoint(plan["final_path"])
        stored = ckpt.get("inputs")
        inputs = distill_trainer.current_inputs(plan["cfg"], stored) if stored else None
        check_same_inputs(plan["final_path"], ckpt, plan["cfg"].to_dict(), inputs,
                          f"arm '{name}' asks for other ones now: use another --out_dir or move "
                          f"{plan['dir']} away to train it again")
        print(f"[{name}] final checkpoint exists: skipping training", flush=True)
        return
    print(f"[{name}] training into {plan['dir']}", flush=True)
    try:
        code = distill_trainer.train(plan["cfg"])
    except UserError as e:
        distributed.cleanup(together=False)
        raise UserError(f"arm '{name}': {e}") from None
    distributed.cleanup(together=code == 0)
    if code in (distill_trainer.EXIT_REQUEUE, distill_trainer.EXIT_INTERRUPTED):
        raise Requeue(f"arm '{name}' checkpointed after a stop signal", code)
    if code != 0:
        raise UserError(
            f"arm '{name}': training stopped with exit code {code} (message above); fix it and "
            "rerun: finished arms are skipped"
        )


# ----------------------------------------------------------------- evaluation
def teacher_identity(plan: Dict[str, Any], args: argparse.Namespace) -> Optional[Tuple]:
    """What a KD arm's teacher is: name, weights (the arm, for --teacher_from_arm: one teacher per
    seed is still one row), input size; None for arms without a teacher."""
    if plan["cfg"].train.objective != "distill":
        return None
    m = dinov2_patcher.teacher_identity(plan["cfg"].model)
    weights = f"arm {args.teacher_from_arm}" if args.teacher_from_arm else (
        m["weights"] or ("pretrained" if m["pretrained"] else "random init"))
    return (m["name"], weights, m["source"], m["img_size"])


def teacher_labels(plans: List[Dict[str, Any]], args: argparse.Namespace) -> Dict[int, str]:
    """id(plan) -> its teacher's row label: teacher@<px>, with the name (or a number) only where the
    input size alone does not tell the teachers apart."""
    identities = {id(p): teacher_identity(p, args) for p in plans}
    distinct = list(dict.fromkeys(i for i in identities.values() if i is not None))
    labels = {}
    for i, identity in enumerate(distinct):
        name, _, _, size = identity
        same_size = [d for d in distinct if d[3] == size]
        same_name = [d for d in same_size if d[0] == name]
        tag = "" if len(same_size) == 1 else (f":{name}" if len(same_name) == 1 else f"{i + 1}")
        labels[identity] = f"teacher{tag}@{size}"
    return {key: labels[identity] for key, identity in identities.items() if identity is not None}


def evaluate_arms(plans: List[Dict[str, Any]], args: argparse.Namespace, base: Config,
                  only: Optional[List[Dict[str, Any]]] = None,
                  legacy: bool = True) -> List[Dict[str, Any]]:
    """Probes every (arm, seed) on base.data with the fixed-C probe too: [{arm, seed, teacher,
    entries}]; `only` those plans (a grid job: the baselines go where they go in the whole grid),
    `legacy` the earlier runs too.

    Per seed the untrained student goes with the first arm; each distinct teacher with the first
    distill arm that uses it (one DINOv2 teacher serves every seed: probed once). The legacy
    re-probes take their architecture from `base` (the config files with --override), as every arm
    does.
    """
    results, untrained_done, teachers_done = [], set(), set()
    labels = teacher_labels(plans, args)
    for plan in plans:
        cfg = plan["cfg"]
        teacher = (ev.teacher_key(cfg.model), cfg.model.student_img_size)
        with_teacher = cfg.train.objective == "distill" and teacher not in teachers_done
        with_untrained = plan["seed"] not in untrained_done
        teachers_done.update([teacher] if with_teacher else [])
        untrained_done.add(plan["seed"])
        if only is not None and not any(plan is p for p in only):
            continue
        entries = ev.evaluate_run(
            ev.options(
                plan["dir"],
                epochs=cfg.train.save_epochs,
                eval_teacher=with_teacher,
                eval_untrained=with_untrained,
                device=args.device,
                batch_size=args.eval_batch_size,
                linear_probe_C=1.0,
                data=base.data,
            )
        )
        results.append({"arm": plan["arm"], "seed": plan["seed"], "teacher": labels.get(id(plan)),
                        "entries": entries})
    legacy_data = None if args.legacy_data_config else base.data
    for arm, directory in (("legacy", args.legacy_dir), ("legacy_cifar", args.legacy_cifar_dir)):
        if directory and legacy:
            entries = ev.evaluate_run(ev.options(
                directory, model=base.model, data_config=args.legacy_data_config, data=legacy_data,
                device=args.device, linear_probe_C=1.0, batch_size=args.eval_batch_size,
                output_file=os.path.join(args.out_dir, f"{arm}_eval_results.json")))
            results.append({"arm": arm, "seed": None, "teacher": None, "entries": entries})
    return results


def transfer_note(plans: List[Dict[str, Any]], args: argparse.Namespace) -> Optional[str]:
    """The optimizer steps kd and the folder arms took (their final checkpoints' step plans)."""
    folder = [p for p in plans if p["cfg"].data.dataset_name == "folder"]
    if not folder:
        return None
    seen = {}
    for p in plans:
        wanted = p["arm"] == "kd" or p in folder
        if wanted and p["arm"] not in seen and os.path.isfile(p["final_path"]):
            plan = load_checkpoint(p["final_path"]).get("scheduler") or {}
            seen[p["arm"]] = (f"{p['arm']} {plan.get('total_steps')} steps "
                              f"({plan.get('steps_per_epoch')}/epoch, "
                              f"{plan.get('num_train_images')} images)")
    how = {"steps": "step-matched to kd (same optimizer and warmup steps)",
           "epochs": "epoch-matched to kd (same epochs of its own, possibly larger, folder)"}
    return (f"--transfer_match {args.transfer_match}: the folder arms are "
            f"{how[args.transfer_match]}; "
            f"{'; '.join(seen.values()) or 'no final checkpoint to read the steps from'}.")


# ----------------------------------------------------------------- report: rows, intervals
def rows_from(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One flat row per evaluated entry: the arms' checkpoints, then legacy checkpoints, then the
    baselines (a teacher row labelled by its teacher, e.g. teacher@224); per-image correctness where
    predicted."""
    groups: Dict[str, List[Dict[str, Any]]] = {"arms": [], "legacy": [], "baselines": []}
    for result in results:
        arm = result["arm"]
        for e in result["entries"]:
            baseline = e["kind"] in ("teacher", "untrained")
            label = e["name"]
            if e["kind"] == "teacher" and result.get("teacher"):
                label = result["teacher"].replace("teacher", e["name"], 1)
            d = e["diagnostics"]
            labels = e.get("test_labels")
            correct = {}
            for p in metrics.PROBES.values():  # per image, for the paired contrasts
                predicted = (e.get("predictions") or {}).get(p.key)
                if predicted is not None and labels is not None:
                    correct[row_key(p)] = predicted == labels
            group = "baselines" if baseline else ("legacy" if arm.startswith("legacy") else "arms")
            groups[group].append({
                "arm": label if baseline else arm, "seed": result["seed"], "epoch": e["epoch"],
                # Result files written before a probe existed lack its key: None, "–" in the tables.
                **{row_key(p): e.get(p.key) for p in metrics.PROBES.values()},
                "num_test": e.get("num_test"), "num_classes": e.get("num_classes"),
                "test_id": e.get("test_id"), "random_init": e.get("random_init", False),
                "pairwise_cos": d["pairwise_cos"], "effective_rank": d["effective_rank"],
                "student_teacher_cos": d["student_teacher_cos"], "collapsed": d["collapsed"],
                "collapsed_legacy_cos": d.get("collapsed_legacy_cos",
                                              d["pairwise_cos"] > report.COLLAPSE_COS),
                "correct": correct})
    return groups["arms"] + groups["legacy"] + groups["baselines"]


def summarize(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (arm, epoch), in row order: n runs, and per accuracy its mean and 95 % interval (seeds
    and test set, stats.accuracy_interval, within [0, 100]); diagnostics averaged, collapse
    counted."""
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["epoch"]), []).append(r)
    summary = []
    for (arm, epoch), group in groups.items():
        s = {"arm": arm, "epoch": epoch, "n": len(group), "seeds": [r["seed"] for r in group],
             "num_test": group[0]["num_test"]}
        for key in map(row_key, metrics.PROBES.values()):
            values = [r[key] for r in group if r.get(key) is not None]
            if values and len(values) == len(group) and s["num_test"]:
                lo, hi = stats.accuracy_interval(values, s["num_test"])
                s[key] = {"mean": sum(values) / len(values), "lo": lo, "hi": hi, "values": values}
            else:
                s[key] = None
        for key in ("pairwise_cos", "effective_rank", "student_teacher_cos"):
            values = [r[key] for r in group if r[key] is not None]
            s[key] = sum(values) / len(values) if values else None
        s["collapsed"] = sum(bool(r["collapsed"]) for r in group)
        s["collapsed_legacy_cos"] = sum(bool(r["collapsed_legacy_cos"]) for r in group)
        summary.append(s)
    return summary


def cell(value: Optional[Dict[str, float]]) -> Optional[str]:
    """'72.10 [70.02, 74.18]': mean and 95 % interval."""
    return None if value is None else f"{value['mean']:.2f} [{value['lo']:.2f}, {value['hi']:.2f}]"


def row_key(p: metrics.Probe) -> str:
    """A probe's name in the rows and summaries (report.json, the verdict)."""
    return p.row_key or p.key


def summary_table() -> List[report.Column]:
    """Per arm and epoch: a column per probe (mean [95 % interval]), then the diagnostics."""
    probes = [(p.title, lambda s, k=row_key(p): cell(s[k]), "s") for p in metrics.PROBES.values()]
    return [("arm", "arm", "s"), ("epoch", "epoch", "d"), ("n", "n", "d"), *probes,
            ("pairwise cos", "pairwise_cos", ".3f"), ("eff. rank", "effective_rank", ".1f"),
            ("cos(Ps,t)", "student_teacher_cos", ".3f"),
            ("collapsed", lambda s: f"{s['collapsed']}/{s['n']}", "s"),
            ("collapsed (legacy cos)", lambda s: f"{s['collapsed_legacy_cos']}/{s['n']}", "s")]


def row_table() -> List[report.Column]:
    """Every run: a column per probe, then the diagnostics."""
    probes = [(p.title, row_key(p), ".2f") for p in metrics.PROBES.values()]
    return [("arm", "arm", "s"), ("seed", "seed", "d"), ("epoch", "epoch", "d"), *probes,
            ("eff. rank", "effective_rank", ".1f"), ("collapsed", "collapsed", ""),
            ("collapsed (legacy cos)", "collapsed_legacy_cos", "")]


# ----------------------------------------------------------------- report: files
def verdict_context(plans: List[Dict[str, Any]], args: argparse.Namespace) -> verdict.Context:
    teachers = teacher_labels(plans, args)
    return verdict.Context(
        margin=args.margin, legacy_figure=tuple(args.legacy_figure),
        teacher_of={p["arm"]: teachers[id(p)] for p in plans if id(p) in teachers},
        teacher_from_arm=args.teacher_from_arm, random_teacher=random_teacher(plans),
        transfer_note=transfer_note(plans, args),
        label_arms=sorted({p["arm"] for p in plans if distill_loss.uses_labels(p["cfg"].train)}),
        flags={"transfer_root": bool(args.transfer_root), "legacy_dir": bool(args.legacy_dir),
               "legacy_cifar_dir": bool(args.legacy_cifar_dir)})


def random_teacher(plans: List[Dict[str, Any]]) -> bool:
    """A KD arm distils from a randomly initialised teacher (no pretrained weights, no file)."""
    return any(p["cfg"].train.objective == "distill" and p["cfg"].model.teacher_source == "timm"
               and not p["cfg"].model.teacher_pretrained and not p["cfg"].model.teacher_weights
               for p in plans)


def missing_epochs(plans: List[Dict[str, Any]], rows: List[Dict[str, Any]],
                   epochs: List[int]) -> List[str]:
    """Per (arm, seed), the requested epochs without a row and why (e.g. a reused arm that saved
    other epochs)."""
    out = []
    for plan in plans:
        present = {r["epoch"] for r in rows
                   if r["arm"] == plan["arm"] and r["seed"] == plan["seed"]}
        absent = [e for e in sorted(set(epochs)) if e not in present]
        if not absent:
            continue
        names = os.listdir(plan["dir"]) if os.path.isdir(plan["dir"]) else []
        saved = sorted(int(m.group(1)) for m in (ev.CHECKPOINT_RE.search(f) for f in names) if m)
        reasons = [f"epoch {e}: " + ("its checkpoint could not be evaluated (see the warnings)"
                                     if e in saved else f"no checkpoint_epoch_{e}.pth")
                   for e in absent]
        held = ", ".join(map(str, saved)) or "none"
        out.append(f"{plan['arm']} seed {plan['seed']} ({', '.join(reasons)}; {plan['dir']} holds "
                   f"epochs {held}: a run reused from an earlier invocation keeps the epochs that "
                   f"one saved; train it again in another --out_dir for these)")
    return out


def write_report(
    plans: List[Dict[str, Any]], results: List[Dict[str, Any]], args: argparse.Namespace
) -> str:
    """report.md (tables and verdict), report.png (accuracy with intervals and loss per arm) and
    report.json; returns the markdown."""
    rows = rows_from(results)
    summary = summarize(rows)
    arms = verdict.final_arms(rows)
    conclusions = verdict.conclusions(arms, verdict_context(plans, args))
    conclusions += verdict.collapse_sentences(summary)
    grid = verdict.two_by_two_table(arms)
    meta = run_metadata()
    seeds = sorted({p["seed"] for p in plans})
    missing = missing_epochs(plans, rows, args.epochs)
    text = (
        "\n\n".join([
            "# Experiment report",
            *(
                [conclusions.pop(0)]
                if conclusions[0].startswith("**The teacher is randomly")
                else []
            ),
            f"Arms: {', '.join(dict.fromkeys(p['arm'] for p in plans))}; seeds:"
            f" {', '.join(map(str, seeds))}; requested epochs: {', '.join(map(str, args.epochs))};"
            f" probed on {args.eval_data_description}. torch {meta.get('torch')}, timm"
            f" {meta.get('timm')}, git {str(meta.get('git_sha'))[:12]}. "
            + report.probe_note(),
            *(["Missing from the tables: " + "; ".join(missing) + "."] if missing else []),
            "Mean and 95 % interval per arm and epoch (seeds and test set):",
            report.markdown_table(summary, summary_table(), missing="–"),
            *(["## Pipeline x training data", grid] if grid else []),
            "## Verdict",
            "\n".join(f"- {c}" for c in conclusions),
            "![accuracy and loss](report.png)",
            "## Every run",
            report.markdown_table(rows, row_table(), missing="–"),
        ])
        + "\n"
    )
    first_seed: Dict[str, str] = {}
    for p in plans:
        first_seed.setdefault(p["arm"], p["dir"])
    curves = {arm: report.loss_curve(directory) for arm, directory in first_seed.items()}
    kinds = {p["arm"]: p["cfg"].train.objective for p in plans}
    series = {arm: [(s["epoch"], *(s["linear_acc"][k] for k in ("mean", "lo", "hi")))
                    for s in summary if s["arm"] == arm and s["linear_acc"]] for arm in first_seed}
    baselines = {s["arm"]: (s["linear_acc"]["mean"], s["linear_acc"]["lo"], s["linear_acc"]["hi"])
                 for s in summary if s["epoch"] is None and s["linear_acc"]}
    title = "linear probe vs epoch (mean over seeds, 95 % interval; loss of the first seed)"
    png = report.png_bytes(report.experiment_figure(series, baselines, curves, kinds, title))
    json_rows = [{k: v for k, v in r.items() if k != "correct"} for r in rows]
    report.write_files(os.path.join(args.out_dir, "report.json"),
                       {"rows": json_rows, "summary": summary, "two_by_two": grid,
                        "verdict": conclusions, "missing_epochs": missing, "loss_curves": curves,
                        "meta": meta}, text, png)
    return text


# ----------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                       epilog="The decision table and the report: docs/experiments.md; config keys: "
                              "docs/configuration.md.")
    p.add_argument("--arms", nargs="+", default=None, help="default: all of configs/experiments/")
    p.add_argument(
        "--epochs", type=int, nargs="+", default=[1, 10, 20, 50], help="epochs to save and probe"
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help=(
            "train and probe every arm per seed (train.seed) into <out_dir>/<arm>/seed<k>/;"
            " default: one run per arm with the configs' seed, in <out_dir>/<arm>/"
        ),
    )
    p.add_override("applied to every arm, after the arm's own file")
    p.add_argument("--out_dir", default="experiments",
                   help="every arm trains into OUT_DIR/<arm>[/seed<k>]; the report goes to OUT_DIR "
                        "(default: %(default)s)")
    p.add_argument("--data_config", default=os.path.join(HERE, DEFAULT_FILES["data"]),
                   help="default: the repo's data_config.yaml")
    p.add_argument("--train_config", default=os.path.join(HERE, DEFAULT_FILES["train"]),
                   help="default: the repo's train_config_kd.yaml")
    p.add_argument("--model_config", default=os.path.join(HERE, DEFAULT_FILES["model"]),
                   help="default: the repo's model_config_kd.yaml")
    p.add_argument(
        "--teacher_from_arm",
        default=None,
        help="use this arm's final student as the KD arms' teacher",
    )
    p.add_argument(
        "--transfer_root",
        default=None,
        help=f"folder of images (any sub-folders) the {TRANSFER_ARM} arm trains on; adds that arm",
    )
    p.add_argument("--transfer_source_size", type=int, default=None,
                   help="store the transfer images at N x N px (needed when their sizes differ)")
    p.add_argument(
        "--legacy_dir",
        default=None,
        help="earlier run's checkpoints (legacy format) to re-probe: old pipeline x other data",
    )
    p.add_argument(
        "--legacy_cifar_dir",
        default=None,
        help="the earlier pipeline's own CIFAR-10 run, if you have it: old pipeline x CIFAR-10",
    )
    p.add_argument(
        "--legacy_data_config",
        default=None,
        help="data config for the legacy probes (default: the data section every arm is probed on)",
    )
    p.add_argument("--margin", type=float, default=2.0, metavar="POINTS",
                   help="the smallest difference in accuracy points that matters: within it, "
                        "arms are 'equivalent'")
    p.add_argument(
        "--legacy_figure",
        type=float,
        nargs=2,
        default=list(LEGACY_FIGURE),
        metavar=("LO", "HI"),
        help=(
            "the %% range the earlier runs' probe gave; the earlier probe must reproduce "
            "it (away from chance) before P is read"
        ),
    )
    p.add_argument("--transfer_match", choices=("steps", "epochs"), default="steps",
                   help="folder arms get kd's optimizer and warmup steps (steps) or its epochs "
                        "(epochs)")
    p.add_argument("--device", default=None,
                   help="evaluation device (cuda, cuda:N, cpu); default: cuda when available, else "
                        "cpu. Training uses train.device")
    p.add_argument("--eval_batch_size", type=int, default=256,
                   help="images per forward pass when the evaluator extracts features "
                        "(default: %(default)s)")
    p.add_argument(
        "--dry_run", action="store_true", help="print each arm's trainer arguments and stop"
    )
    slurm_grid.add_arguments(p)
    args = p.parse_args(argv)
    if args.seeds is not None and (len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0):
        p.error(
            f"argument --seeds: expected distinct seeds >= 0, got {' '.join(map(str, args.seeds))}"
        )
    if args.transfer_source_size is not None and args.transfer_source_size < 1:
        p.error("argument --transfer_source_size: must be > 0")
    if not args.margin > 0:
        p.error(f"argument --margin: must be > 0 points, got {args.margin:g}")
    lo, hi = args.legacy_figure
    if not 0 <= lo < hi <= 100:
        p.error(f"argument --legacy_figure: expected LO < HI within 0..100 (%), got {lo:g} {hi:g}")
    return args


@one_line_warnings()
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*xFormers.*")
    try:
        with SuiteSignals() as stop:
            plans = plan_arms(args)
            if args.dry_run:
                for plan in plans:
                    seed = f" seed{plan['seed']}" if args.seeds else ""
                    print(f"{plan['arm']}{seed}: {trainer_arguments(plan['cfg'], args)}")
                return 0
            if args.slurm or args.slurm_task or args.slurm_report:
                suite = slurm_grid.Suite(train_arm, evaluate_arms, base_config, write_report)
                return slurm_grid.main(plans, args, sys.argv[1:] if argv is None else argv, suite)
            check_outputs(plans, args)
            stop.phase = "training (between arms)"
            for plan in plans:  # out_dir and the arms' folders appear with their first file
                train_arm(plan)
            base = base_config(args)
            args.eval_data_description = f"{base.data.dataset_name} {base.data.dataset_root}"
            stop.phase = "evaluating"
            results = evaluate_arms(plans, args, base)
            stop.phase = "writing the report"
            print("\n" + write_report(plans, results, args), flush=True)
    except Stopped as e:
        message, code = e.args
        print(f"{message}: finished arms and evaluations are saved; exiting with {code}; rerun "
              f"the same command to continue", flush=True)
        return code
    except Requeue as e:
        message, code = e.args
        print(f"{message}: exiting with {code}; rerun the same command to continue", flush=True)
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one while evaluating
        print(
            "interrupted (Ctrl-C); rerun the same command to continue: finished arms are skipped",
            file=sys.stderr,
        )
        return distill_trainer.EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
