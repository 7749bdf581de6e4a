"""Answers the repo's question in one command: trains the experiment arms, probes them, writes a report with a verdict.

Launch:
    python run_experiments.py                                   # every arm in configs/experiments/, epochs 1 10 20 50
    python run_experiments.py --arms kd supervised --epochs 1 10 20 50
    python run_experiments.py --arms supervised kd --teacher_from_arm supervised   # no DINOv2 weights at hand
    python run_experiments.py --arms kd supervised --seeds 0 1 2  # every arm per seed: mean and 95 % interval
    python run_experiments.py --arms kd kd_transfer --transfer_root /data/other96px \
        --legacy_dir /path/to/old/run --legacy_cifar_dir /path/to/old/cifar_run   # the 2x2: pipeline x data
    python run_experiments.py --arms kd --dry_run                # print each arm's trainer arguments (for sbatch)

Each arm is `configs/experiments/<arm>.yaml` (values on top of the three main configs; --override wins over them),
trained in this process into `<out_dir>/<arm>/` (with --seeds: `<out_dir>/<arm>/seed<k>/`, train.seed = k; skipped
when its final checkpoint exists: the command is resumable), evaluated with evaluate_checkpoints.py on the base data
section (CIFAR-10 for every arm, also kd_transfer, which trains on the --transfer_root folder), and summarised in
`<out_dir>/report.md`, `report.png` and `report.json`. The teacher and untrained baselines are probed once per seed
(a teacher shared by all seeds once). Comparisons in the verdict come from 95 % intervals (stats.py): t over seeds,
or the binomial interval of the test set for a single run.
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
from typing import Any, Dict, List, Optional

import yaml

import distill_trainer
import distributed
import evaluate_checkpoints as ev
import report
import slurm_grid
import stats
from checkpoint import check_output_file, check_same_inputs, load_checkpoint, run_metadata
from config import (DEFAULT_FILES, SECTIONS, ArgumentParser, Config, DataConfig, UserError, dotted,
                    load_config, one_line_warnings, parse_override, read_yaml, replace_values)

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS_DIR = os.path.join(HERE, "configs", "experiments")
TRANSFER_ARM = "kd_transfer"  # its arm file sets data.dataset_name: folder; the folder is --transfer_root
LEGACY_FIGURE = (11.0, 13.0)  # % the earlier runs probed at on CIFAR-10 (README), checked to +/- LEGACY_TOLERANCE
LEGACY_TOLERANCE = 3.0
ACCURACIES = ("linear_acc", "linear_acc_cls_patch", "fixed_C_acc", "knn_acc")


class Requeue(Exception):
    """The trainer saved and stopped on SIGUSR1/SIGTERM: exit with its requeue code; a rerun resumes the arm."""


class Stopped(BaseException):
    """SIGUSR1/SIGTERM outside training: raised at once by SuiteSignals (a BaseException, so no `except Exception`
    on the way swallows it); args (message, exit code)."""


class SuiteSignals:
    """SIGUSR1 (SLURM's pre-timeout signal) and SIGTERM stop the suite where it is, outside training too, with the
    requeue code 75 (the sbatch wrapper requeues). While an arm trains, the trainer's own handler is installed
    instead (it saves and returns 75). What is finished is on disk: checkpoints, each probed arm's eval_results
    files (written atomically); the rerun skips finished arms. `phase` names what was interrupted."""
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.phase = "planning"
        self._previous = {}

    def __enter__(self) -> "SuiteSignals":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        raise Stopped(f"stopped by {signal.Signals(signum).name} while {self.phase}",
                      distill_trainer.EXIT_REQUEUE)


# ----------------------------------------------------------------- arms
def available_arms() -> List[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ARMS_DIR, "*.yaml")))


def arm_file(arm: str) -> str:
    path = os.path.join(ARMS_DIR, f"{arm}.yaml")
    if not os.path.isfile(path):
        raise UserError(f"--arms: unknown arm '{arm}'; available: {', '.join(available_arms())}")
    return path


def arm_list(args: argparse.Namespace) -> List[str]:
    """--arms in order, the teacher arm first; kd_transfer needs --transfer_root (and is added by it)."""
    arms = list(dict.fromkeys(args.arms or available_arms()))
    if args.transfer_root and TRANSFER_ARM not in arms:
        arms.append(TRANSFER_ARM)
    if TRANSFER_ARM in arms and not args.transfer_root:
        if args.arms:
            raise UserError(f"--arms {TRANSFER_ARM} trains on another dataset: pass --transfer_root DIR (a folder "
                            f"of images, e.g. the earlier 96 px training set)")
        arms.remove(TRANSFER_ARM)  # the default "every arm" means every arm that can run
    if args.teacher_from_arm:
        if args.teacher_from_arm not in arms:
            raise UserError(f"--teacher_from_arm {args.teacher_from_arm}: add it to --arms so it is trained first")
        arms.remove(args.teacher_from_arm)
        arms.insert(0, args.teacher_from_arm)
    return arms


def plan_arms(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Each (seed, arm)'s validated config; per seed the teacher arm first, whose final student is then the teacher
    of that seed's KD arms when --teacher_from_arm is used.

    Values by precedence, lowest first: the three config files, the arm's file ({section: {key: value}}),
    --override, and what this script sets (checkpoint_dir, save_epochs from --epochs, the seed, the transfer
    folder, the arm teacher).
    """
    arms = arm_list(args)
    files = {arm: arm_file(arm) for arm in arms}
    base = base_config(args)
    user = dotted({f"{section}.{key}": value for section, key, value in map(parse_override, args.override)})
    plans = []
    for seed in args.seeds or [None]:
        teacher_plan = None
        for arm in arms:
            arm_values = read_yaml(files[arm])
            cfg = replace_values(base, arm_values, files[arm])
            cfg = replace_values(cfg, user, f"--override {' '.join(args.override)}")  # over the arm's values
            final = cfg.train.num_epochs
            if any(e > final or e < 1 for e in args.epochs):
                raise UserError(f"--epochs {args.epochs}: every epoch must lie in 1..train.num_epochs={final}")
            run_dir = os.path.join(args.out_dir, arm, *([] if seed is None else [f"seed{seed}"]))
            own = {"train.checkpoint_dir": run_dir, "train.save_epochs": sorted(set(args.epochs) | {final})}
            if seed is not None:
                own["train.seed"] = seed
            if (arm_values.get("data") or {}).get("dataset_name") == "folder":
                own.update({"data.dataset_name": "folder", "data.dataset_root": os.path.abspath(args.transfer_root),
                            "data.source_size": args.transfer_source_size})
            if teacher_plan is not None and cfg.train.objective == "distill":
                # The finished supervised student becomes the frozen teacher, at its own input size (6x6 grid -> 6x6).
                own.update({"model.teacher_weights": teacher_plan["final_path"],
                            "model.teacher_name": teacher_plan["cfg"].model.student_name,
                            "model.teacher_img_size": teacher_plan["cfg"].model.student_img_size})
            cfg = replace_values(cfg, dotted(own), "run_experiments.py")
            plan = {"arm": arm, "seed": cfg.train.seed, "cfg": cfg, "dir": cfg.train.checkpoint_dir,
                    "final_path": os.path.join(cfg.train.checkpoint_dir, f"checkpoint_epoch_{final}.pth")}
            if arm == args.teacher_from_arm:
                teacher_plan = plan
            plans.append(plan)
    return plans


def base_config(args: argparse.Namespace) -> Config:
    """The three files with --override: its data section is what every arm is probed on."""
    # save_epochs is set from --epochs last; [1] keeps every layer below valid whatever num_epochs it sets.
    return load_config(args.data_config, args.train_config, args.model_config,
                       args.override + ["train.save_epochs=[1]"])


def trainer_arguments(cfg: Config, args: argparse.Namespace) -> str:
    """distill_trainer.py arguments giving `cfg`, for sbatch: the three files, an --override per changed value."""
    paths = {"data": args.data_config, "train": args.train_config, "model": args.model_config}
    files = {s: {**dataclasses.asdict(SECTIONS[s]()), **read_yaml(path)} for s, path in paths.items()}
    argv = ["--data_config", args.data_config, "--train_config", args.train_config, "--model_config",
            args.model_config, "--override"]
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if value != files[section][key]:  # YAML text that --override reads back as the same value
                text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).replace("\n...\n", "")
                argv.append(f"{section}.{key}={text.strip()}")
    return " ".join(map(shlex.quote, argv))


# ----------------------------------------------------------------- training
def check_outputs(plans: List[Dict[str, Any]], args: argparse.Namespace) -> None:
    """Every file the evaluation and the report will write, checked before the first arm trains."""
    check_output_file("--out_dir", os.path.join(args.out_dir, "report.json"))
    for plan in plans:
        check_output_file("--out_dir", os.path.join(plan["dir"], "eval_results.json"))
    for arm, directory in (("legacy", args.legacy_dir), ("legacy_cifar", args.legacy_cifar_dir)):
        if directory:
            check_output_file("--out_dir", os.path.join(args.out_dir, f"{arm}_eval_results.json"))


def train_arm(plan: Dict[str, Any]) -> None:
    """Trains one arm unless its final checkpoint exists and was trained with this very config."""
    name = f"{plan['arm']} seed {plan['seed']}"
    if os.path.isfile(plan["final_path"]):
        # Reused only when a resume would accept it: same config up to config.HARMLESS_KEYS, same data, same teacher.
        ckpt = load_checkpoint(plan["final_path"])
        inputs = distill_trainer.current_inputs(plan["cfg"], ckpt["inputs"]) if ckpt.get("inputs") else None
        check_same_inputs(plan["final_path"], ckpt, plan["cfg"].to_dict(), inputs,
                          f"arm '{name}' asks for other ones now: use another --out_dir or move {plan['dir']} away "
                          f"to train it again")
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
        raise UserError(f"arm '{name}': training stopped with exit code {code} (message above); fix it and "
                        f"rerun: finished arms are skipped")


# ----------------------------------------------------------------- evaluation
def evaluate_arms(plans: List[Dict[str, Any]], args: argparse.Namespace, eval_data: DataConfig,
                  only: Optional[List[Dict[str, Any]]] = None, legacy: bool = True) -> List[Dict[str, Any]]:
    """Probes every (arm, seed) on `eval_data` with the fixed-C probe too: [{arm, seed, entries}]; `only`
    those plans (a grid job: the baselines go where they go in the whole grid), `legacy` the earlier runs too.

    Per seed the untrained student goes with the first arm; the teacher goes with the first distill arm whose
    teacher was not probed yet (one DINOv2 teacher serves every seed: probed once).
    """
    results, untrained_done, teachers_done = [], set(), set()
    for plan in plans:
        cfg = plan["cfg"]
        teacher = (ev.teacher_key(cfg.model), cfg.model.student_img_size)
        with_teacher = cfg.train.objective == "distill" and teacher not in teachers_done
        with_untrained = plan["seed"] not in untrained_done
        teachers_done.update([teacher] if with_teacher else [])
        untrained_done.add(plan["seed"])
        if only is not None and not any(plan is p for p in only):
            continue
        entries = ev.evaluate_run(ev.options(
            plan["dir"], epochs=cfg.train.save_epochs, eval_teacher=with_teacher, eval_untrained=with_untrained,
            device=args.device, batch_size=args.eval_batch_size, linear_probe_C=1.0, data=eval_data))
        results.append({"arm": plan["arm"], "seed": plan["seed"], "entries": entries})
    legacy_data = None if args.legacy_data_config else eval_data
    for arm, directory in (("legacy", args.legacy_dir), ("legacy_cifar", args.legacy_cifar_dir)):
        if directory and legacy:
            entries = ev.evaluate_run(ev.options(
                directory, model_config=args.model_config, data_config=args.legacy_data_config, data=legacy_data,
                device=args.device, linear_probe_C=1.0, batch_size=args.eval_batch_size,
                output_file=os.path.join(args.out_dir, f"{arm}_eval_results.json")))
            results.append({"arm": arm, "seed": None, "entries": entries})
    return results


# ----------------------------------------------------------------- report: rows, intervals
def rows_from(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One flat row per evaluated entry: the arms' checkpoints, then legacy checkpoints, then the baselines."""
    groups = {"arms": [], "legacy": [], "baselines": []}
    for result in results:
        arm = result["arm"]
        for e in result["entries"]:
            baseline = e["kind"] in ("teacher", "untrained")
            d = e["diagnostics"]
            groups["baselines" if baseline else ("legacy" if arm.startswith("legacy") else "arms")].append({
                "arm": e["name"] if baseline else arm, "seed": result["seed"], "epoch": e["epoch"],
                "linear_acc": e["linear_acc"], "linear_acc_cls_patch": e.get("linear_acc_cls_patch"),
                "knn_acc": e["knn_acc"], "fixed_C_acc": e["linear_acc_fixed_C"], "num_test": e.get("num_test"),
                "pairwise_cos": d["pairwise_cos"], "effective_rank": d["effective_rank"],
                "student_teacher_cos": d["student_teacher_cos"], "collapsed": d["collapsed"],
                "collapsed_legacy_cos": d.get("collapsed_legacy_cos", d["pairwise_cos"] > report.COLLAPSE_COS)})
    return groups["arms"] + groups["legacy"] + groups["baselines"]


def summarize(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (arm, epoch), in row order: n runs, and per accuracy its mean and 95 % interval (t over seeds, Wilson
    on the test set for one run); diagnostics averaged, collapse counted."""
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["epoch"]), []).append(r)
    summary = []
    for (arm, epoch), group in groups.items():
        s = {"arm": arm, "epoch": epoch, "n": len(group), "seeds": [r["seed"] for r in group],
             "num_test": group[0]["num_test"]}
        for key in ACCURACIES:
            values = [r[key] for r in group if r[key] is not None]
            if values and len(values) == len(group) and (len(values) > 1 or s["num_test"]):
                lo, hi = stats.accuracy_interval(values, s["num_test"] or 1)
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


SUMMARY_TABLE = [("arm", "arm", "s"), ("epoch", "epoch", "d"), ("n", "n", "d"),
                 ("linear % [95 % CI]", lambda s: cell(s["linear_acc"]), "s"),
                 ("CLS+patch %", lambda s: cell(s["linear_acc_cls_patch"]), "s"),
                 ("fixed-C probe %", lambda s: cell(s["fixed_C_acc"]), "s"),
                 ("kNN %", lambda s: cell(s["knn_acc"]), "s"), ("pairwise cos", "pairwise_cos", ".3f"),
                 ("eff. rank", "effective_rank", ".1f"), ("cos(Ps,t)", "student_teacher_cos", ".3f"),
                 ("collapsed", lambda s: f"{s['collapsed']}/{s['n']}", "s"),
                 ("collapsed (legacy cos)", lambda s: f"{s['collapsed_legacy_cos']}/{s['n']}", "s")]
ROW_TABLE = [("arm", "arm", "s"), ("seed", "seed", "d"), ("epoch", "epoch", "d"), ("linear %", "linear_acc", ".2f"),
             ("CLS+patch %", "linear_acc_cls_patch", ".2f"), ("fixed-C probe %", "fixed_C_acc", ".2f"),
             ("kNN %", "knn_acc", ".2f"), ("eff. rank", "effective_rank", ".1f"), ("collapsed", "collapsed", ""),
             ("collapsed (legacy cos)", "collapsed_legacy_cos", "")]


# ----------------------------------------------------------------- report: verdict
def final_rows(summary: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Each arm's last evaluated epoch (legacy runs included), and the baselines."""
    out = {}
    for s in summary:
        if s["arm"] not in out or (s["epoch"] or 0) >= (out[s["arm"]]["epoch"] or 0):
            out[s["arm"]] = s
    return out


def interval(s: Dict[str, Any], key: str = "linear_acc"):
    return (s[key]["lo"], s[key]["hi"])


def described(s: Dict[str, Any], key: str = "linear_acc") -> str:
    v = s[key]
    return f"{v['mean']:.1f} % [{v['lo']:.1f}, {v['hi']:.1f}]"


def versus(a: Dict[str, Any], b: Dict[str, Any], what: str, key: str = "linear_acc") -> str:
    """'vs the untrained student 30.1 % [29.2, 31.0]: better (+12.3 points)'."""
    diff = a[key]["mean"] - b[key]["mean"]
    return f"vs {what} {described(b, key)}: {stats.compare(interval(a, key), interval(b, key))} ({diff:+.1f} points)"


def verdict(summary: List[Dict[str, Any]], teacher_from_arm: Optional[str]) -> List[str]:
    """The report's conclusions, each comparison from the 95 % intervals of the table (stats.compare)."""
    final = final_rows(summary)
    untrained, teacher, supervised = final.get("untrained"), final.get("teacher"), final.get("supervised")
    out = [f"Intervals are 95 %: Student's t over seeds, or the binomial (Wilson) interval of the test set for a "
           f"single run. '{stats.BETTER}' / '{stats.WORSE}' means the two intervals do not overlap; otherwise "
           f"'{stats.SAME}'."]
    if teacher_from_arm:
        out.append(f"The teacher of the KD arms is the `{teacher_from_arm}` arm's final student (the same seed's), "
                   f"not DINOv2: this checks the method against a real, informative teacher where DINOv2 weights "
                   f"could not be had.")
    for arm in (a for a in final if a.startswith("kd")):
        out.append(arm_sentence(arm, final[arm], untrained, teacher, supervised))
    out += collapse_sentences(summary)
    if "kd" in final and untrained:
        word = stats.compare(interval(final["kd"]), interval(untrained))
        teacher_note = f" (with the `{teacher_from_arm}` teacher)" if teacher_from_arm else ""
        meaning = {
            stats.BETTER: "beats the untrained student, unlike the earlier 11–13 % runs: training on CIFAR-10 (or "
                          "the rest of this pipeline: see the 2x2 when run with --transfer_root and --legacy_dir) "
                          "makes the difference.",
            stats.SAME: "shows no detectable difference from the untrained student: the distribution mismatch "
                        "alone does not explain the earlier result; look at the pipeline and objective.",
            stats.WORSE: "is worse than the untrained student even on CIFAR-10: the distribution mismatch does not "
                         "explain the earlier result; look at the pipeline and objective (see the other arms)."}
        out.append(f"Answer: trained on CIFAR-10 itself, the default KD method{teacher_note} " + meaning[word])
    out += two_by_two_verdict(final)
    out += legacy_verdict(summary)
    return out


def arm_sentence(arm: str, r: Dict[str, Any], untrained, teacher, supervised) -> str:
    parts = [f"linear probe {described(r)}, kNN {r['knn_acc']['mean']:.1f} %"]
    if r["fixed_C_acc"] is not None:  # the old probe on this pipeline's weights: does it hide good features?
        word = stats.compare(interval(r), interval(r, "fixed_C_acc"))
        parts.append(f"fixed-C probe {described(r, 'fixed_C_acc')} (validated vs fixed-C probe on the same "
                     f"weights: {word})")
    if untrained:
        parts.append(versus(r, untrained, "the untrained student"))
    if supervised:
        parts.append(versus(r, supervised, "the supervised baseline"))
    if teacher:
        share = 100 * r["linear_acc"]["mean"] / max(teacher["linear_acc"]["mean"], 1e-9)
        parts.append(f"{share:.0f} % of the teacher's {described(teacher)}")
    if teacher and supervised:
        closer = {stats.BETTER: "closer to the teacher than the supervised baseline is",
                  stats.WORSE: "farther from the teacher than the supervised baseline is",
                  stats.SAME: "not detectably closer to the teacher than the supervised baseline"}
        parts.append(closer[stats.compare(interval(r), interval(supervised))])
    return f"**{arm}** (epoch {r['epoch']}, {r['n']} run{'s' if r['n'] > 1 else ''}): " + "; ".join(parts) + "."


def collapse_sentences(summary: List[Dict[str, Any]]) -> List[str]:
    def listed(key: str) -> str:
        hits = [f"{s['arm']} at epoch {s['epoch']} ({s[key]}/{s['n']})" for s in summary
                if s[key] and s["epoch"] is not None]
        return ", ".join(hits) if hits else "none of the evaluated checkpoints"
    return [f"Collapse (centered: effective rank of the test features around their mean < "
            f"{report.COLLAPSE_MIN_RANK}): {listed('collapsed')}.",
            f"Collapse by the legacy criterion (uncentered mean pairwise cosine > {report.COLLAPSE_COS}; a narrow "
            f"cone of still separable features counts here): {listed('collapsed_legacy_cos')}."]


TWO_BY_TWO = {("old pipeline", "other data"): ("legacy", "--legacy_dir"),
              ("old pipeline", "CIFAR-10"): ("legacy_cifar", "--legacy_cifar_dir"),
              ("this pipeline", "other data"): (TRANSFER_ARM, "--transfer_root"),
              ("this pipeline", "CIFAR-10"): ("kd", "--arms kd")}


def two_by_two_table(final: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """{old, this pipeline} x {other data, CIFAR-10}, final checkpoints, probed on CIFAR-10; None when no cell of
    the other data or the old pipeline was asked for."""
    if not any(arm in final for arm in ("legacy", "legacy_cifar", TRANSFER_ARM)):
        return None
    lines = ["| pipeline \\ training data | other data | CIFAR-10 |", "|---|---|---|"]
    for pipeline in ("old pipeline", "this pipeline"):
        cells = []
        for data in ("other data", "CIFAR-10"):
            arm, flag = TWO_BY_TWO[(pipeline, data)]
            r = final.get(arm)
            fixed = f"; fixed-C {r['fixed_C_acc']['mean']:.1f} %" if r and r["fixed_C_acc"] else ""
            cells.append(f"{arm}: {described(r)}{fixed}" if r else f"missing (pass {flag})")
        lines.append(f"| {pipeline} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def two_by_two_verdict(final: Dict[str, Dict[str, Any]]) -> List[str]:
    if two_by_two_table(final) is None:
        return []
    missing = [f"{p} x {d} ({flag})" for (p, d), (arm, flag) in TWO_BY_TWO.items() if arm not in final]
    out = ["2x2 (linear probe on CIFAR-10, final checkpoints): missing cells: " + (", ".join(missing) or "none") + "."]
    effects = {"data in this pipeline (CIFAR-10 vs other data)": ("kd", TRANSFER_ARM),
               "data in the old pipeline (CIFAR-10 vs other data)": ("legacy_cifar", "legacy"),
               "pipeline on the other data (this vs old)": (TRANSFER_ARM, "legacy"),
               "pipeline on CIFAR-10 (this vs old)": ("kd", "legacy_cifar")}
    found = {}
    for name, (a, b) in effects.items():
        if a in final and b in final:
            found[name] = stats.compare(interval(final[a]), interval(final[b]))
            out.append(f"Effect of the {name}: {found[name]} ({final[a]['linear_acc']['mean']:.1f} % vs "
                       f"{final[b]['linear_acc']['mean']:.1f} %).")
    data, pipe = (found.get("data in this pipeline (CIFAR-10 vs other data)"),
                  found.get("pipeline on the other data (this vs old)"))
    if data is not None and pipe is not None:
        cause = {(stats.SAME, stats.BETTER): "the pipeline, not the training data",
                 (stats.BETTER, stats.SAME): "the training data, not the pipeline",
                 (stats.BETTER, stats.BETTER): "both the training data and the pipeline",
                 (stats.SAME, stats.SAME): "neither change alone (no detectable effect of either)"}
        out.append("The earlier low result is explained by " + cause.get((data, pipe), "no simple cause (see the "
                   "effects above)") + ".")
    return out


def legacy_verdict(summary: List[Dict[str, Any]]) -> List[str]:
    """First: does this evaluator's fixed-C probe reproduce the old 11-13 % on the old checkpoints? Only then is
    'the probe' or 'the weights' a possible explanation of the old figure."""
    legacy = [s for s in summary if s["arm"] == "legacy" and s["fixed_C_acc"] is not None]
    if not legacy:
        return []
    values = ", ".join(f"{s['fixed_C_acc']['mean']:.1f} % (epoch {s['epoch']})" for s in legacy)
    low, high = LEGACY_FIGURE[0] - LEGACY_TOLERANCE, LEGACY_FIGURE[1] + LEGACY_TOLERANCE
    if not all(low <= s["fixed_C_acc"]["mean"] <= high for s in legacy):
        return [f"Legacy check: this evaluator's fixed-C probe (C = 1, L2-normalized) gives {values} on the earlier "
                f"checkpoints, not 11–13 % (± {LEGACY_TOLERANCE:g}): the old figure came from something else in "
                f"the old evaluation (its data, preprocessing, feature or code), not from the probe."]
    last = max(legacy, key=lambda s: s["epoch"] or 0)
    word = stats.compare(interval(last), interval(last, "fixed_C_acc"))
    source = {stats.BETTER: "the probe: the validated probe reads far more from the same weights",
              stats.SAME: "the weights: the validated probe finds no more in them",
              stats.WORSE: "the weights: the validated probe reads even less from them"}
    return [f"Legacy check: this evaluator's fixed-C probe reproduces the old figure ({values}, within 11–13 % "
            f"± {LEGACY_TOLERANCE:g}). On the last earlier checkpoint the validated probe gives {described(last)} "
            f"vs fixed-C {described(last, 'fixed_C_acc')}: {word}; the old low number came from {source[word]}."]


# ----------------------------------------------------------------- report: files
def missing_epochs(plans: List[Dict[str, Any]], rows: List[Dict[str, Any]], epochs: List[int]) -> List[str]:
    """Per (arm, seed), the requested epochs without a row and why: e.g. a reused arm that saved other epochs."""
    out = []
    for plan in plans:
        present = {r["epoch"] for r in rows if r["arm"] == plan["arm"] and r["seed"] == plan["seed"]}
        absent = [e for e in sorted(set(epochs)) if e not in present]
        if not absent:
            continue
        names = os.listdir(plan["dir"]) if os.path.isdir(plan["dir"]) else []
        saved = sorted(int(m.group(1)) for m in (ev.CHECKPOINT_RE.search(f) for f in names) if m)
        reasons = [f"epoch {e}: " + ("its checkpoint could not be evaluated (see the warnings)"
                                     if e in saved else f"no checkpoint_epoch_{e}.pth") for e in absent]
        out.append(f"{plan['arm']} seed {plan['seed']} ({', '.join(reasons)}; {plan['dir']} holds epochs "
                   f"{', '.join(map(str, saved)) or 'none'}: a run reused from an earlier invocation keeps the "
                   f"epochs that one saved; train it again in another --out_dir for these)")
    return out


def write_report(plans: List[Dict[str, Any]], results: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    """report.md (tables and verdict), report.png (accuracy and loss per arm) and report.json; returns the markdown."""
    rows = rows_from(results)
    summary = summarize(rows)
    conclusions = verdict(summary, args.teacher_from_arm)
    grid = two_by_two_table(final_rows(summary))
    meta = run_metadata()
    seeds = sorted({p["seed"] for p in plans})
    missing = missing_epochs(plans, rows, args.epochs)
    text = "\n\n".join([
        "# Experiment report",
        f"Arms: {', '.join(dict.fromkeys(p['arm'] for p in plans))}; seeds: {', '.join(map(str, seeds))}; requested "
        f"epochs: {', '.join(map(str, args.epochs))}; probed on {args.eval_data_description}. torch "
        f"{meta.get('torch')}, timm {meta.get('timm')}, git {str(meta.get('git_sha'))[:12]}. " + report.PROBE_NOTE,
        *(["Missing from the tables: " + "; ".join(missing) + "."] if missing else []),
        "Mean and 95 % interval per arm and epoch (t over seeds; one run: binomial interval of the test set):",
        report.markdown_table(summary, SUMMARY_TABLE, missing="–"),
        *(["## Pipeline x training data", grid] if grid else []),
        "## Verdict", "\n".join(f"- {c}" for c in conclusions),
        "![accuracy and loss](report.png)",
        "## Every run", report.markdown_table(rows, ROW_TABLE, missing="–"),
    ]) + "\n"
    first_seed = {}
    for p in plans:
        first_seed.setdefault(p["arm"], p["dir"])
    curves = {arm: report.loss_curve(directory) for arm, directory in first_seed.items()}
    series = {arm: [(s["epoch"], s["linear_acc"]["mean"]) for s in summary if s["arm"] == arm] for arm in first_seed}
    png = report.plot_png(series, {s["arm"]: s["linear_acc"]["mean"] for s in summary if s["epoch"] is None}, curves,
                          "linear probe vs epoch (mean over seeds; loss of the first seed)")
    report.write_files(os.path.join(args.out_dir, "report.json"),
                       {"rows": rows, "summary": summary, "two_by_two": grid, "verdict": conclusions,
                        "missing_epochs": missing, "loss_curves": curves, "meta": meta}, text, png)
    return text


# ----------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", nargs="+", default=None, help="default: all of configs/experiments/")
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 10, 20, 50], help="epochs to save and probe")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train and probe every arm per seed (train.seed) into <out_dir>/<arm>/seed<k>/; default: "
                        "one run per arm with the configs' seed, in <out_dir>/<arm>/")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="applied to every arm, after the arm's own file")
    p.add_argument("--out_dir", default="experiments")
    p.add_argument("--data_config", default=os.path.join(HERE, DEFAULT_FILES["data"]))
    p.add_argument("--train_config", default=os.path.join(HERE, DEFAULT_FILES["train"]))
    p.add_argument("--model_config", default=os.path.join(HERE, DEFAULT_FILES["model"]))
    p.add_argument("--teacher_from_arm", default=None, help="use this arm's final student as the KD arms' teacher")
    p.add_argument("--transfer_root", default=None,
                   help=f"folder of images (any sub-folders) the {TRANSFER_ARM} arm trains on; adds that arm")
    p.add_argument("--transfer_source_size", type=int, default=None,
                   help="store the transfer images at N x N px (needed when their sizes differ)")
    p.add_argument("--legacy_dir", default=None,
                   help="earlier run's checkpoints (legacy format) to re-probe: old pipeline x other data")
    p.add_argument("--legacy_cifar_dir", default=None,
                   help="the earlier pipeline's own CIFAR-10 run, if you have it: old pipeline x CIFAR-10")
    p.add_argument("--legacy_data_config", default=None,
                   help="data config for the legacy probes (default: the data section every arm is probed on)")
    p.add_argument("--device", default=None)
    p.add_argument("--eval_batch_size", type=int, default=256)
    p.add_argument("--dry_run", action="store_true", help="print each arm's trainer arguments and stop")
    slurm_grid.add_arguments(p)
    args = p.parse_args(argv)
    if args.seeds is not None and (len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0):
        p.error(f"argument --seeds: expected distinct seeds >= 0, got {' '.join(map(str, args.seeds))}")
    if args.transfer_source_size is not None and args.transfer_source_size < 1:
        p.error("argument --transfer_source_size: must be > 0")
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
                return slurm_grid.main(plans, args, sys.argv[1:] if argv is None else argv)
            check_outputs(plans, args)
            stop.phase = "training (between arms)"
            for plan in plans:  # out_dir and the arms' folders appear with their first file
                train_arm(plan)
            eval_data = base_config(args).data
            args.eval_data_description = f"{eval_data.dataset_name} {eval_data.dataset_root}"
            stop.phase = "evaluating"
            results = evaluate_arms(plans, args, eval_data)
            stop.phase = "writing the report"
            print("\n" + write_report(plans, results, args), flush=True)
    except Stopped as e:
        message, code = e.args
        print(f"{message}: finished arms and evaluations are saved; exiting with {code}; rerun the same command to "
              f"continue", flush=True)
        return code
    except Requeue as e:
        message, code = e.args
        print(f"{message}: exiting with {code}; rerun the same command to continue", flush=True)
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one while evaluating
        print("interrupted (Ctrl-C); rerun the same command to continue: finished arms are skipped", file=sys.stderr)
        return distill_trainer.EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
