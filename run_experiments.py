"""Answers the repo's question in one command: trains the experiment arms, probes them, writes a report with a verdict.

Launch:
    python run_experiments.py                                   # every arm in configs/experiments/, epochs 1 10 20 50
    python run_experiments.py --arms kd supervised --epochs 1 10 20 50
    python run_experiments.py --arms supervised kd --teacher_from_arm supervised   # no DINOv2 weights at hand
    python run_experiments.py --legacy_dir /path/to/old/run      # also re-probe the earlier (seed-format) checkpoints
    python run_experiments.py --arms kd --dry_run                # print each arm's trainer arguments (for sbatch)

Each arm is `configs/experiments/<arm>.yaml` (overrides on top of the three main configs), trained into
`<out_dir>/<arm>/` (skipped when its final checkpoint exists: the command is resumable), evaluated with
evaluate_checkpoints.py (teacher and untrained baselines once), and summarised in `<out_dir>/report.md`,
`report.png` and `report.json`.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any, Dict, List, Optional

import yaml

import distill_trainer
import evaluate_checkpoints
from checkpoint import load_checkpoint, run_metadata
from config import (DEFAULT_FILES, SECTIONS, ArgumentParser, ConfigError, UserError, load_config, override_text,
                    read_yaml)

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS_DIR = os.path.join(HERE, "configs", "experiments")
COLLAPSE_COS = 0.7
# Keys that do not change what is trained: a finished arm may be reused when only these differ.
RUN_ONLY_KEYS = {"checkpoint_dir", "save_epochs", "save_every", "stop_after_epoch", "log_every", "progress",
                 "num_workers", "cache_dir", "compile", "device", "diag_batch_size"}


class Requeue(Exception):
    """The trainer saved and stopped on SIGUSR1/SIGTERM: exit with its requeue code; a rerun resumes the arm."""


# ----------------------------------------------------------------- arms
def available_arms() -> List[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ARMS_DIR, "*.yaml")))


def arm_overrides(arm: str) -> List[str]:
    """configs/experiments/<arm>.yaml ({section: {key: value}}) as --override strings."""
    path = os.path.join(ARMS_DIR, f"{arm}.yaml")
    if not os.path.isfile(path):
        raise UserError(f"--arms: unknown arm '{arm}'; available: {', '.join(available_arms())}")
    out = []
    for section, values in read_yaml(path).items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level keys must be sections data, train, model with mappings, got "
                              f"'{section}'")
        out += [override_text(f"{section}.{key}", value) for key, value in values.items()]
    return out


def plan_arms(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Each arm's trainer overrides and validated config, the teacher arm first when --teacher_from_arm is used."""
    arms = list(dict.fromkeys(args.arms))
    if args.teacher_from_arm:
        if args.teacher_from_arm not in arms:
            raise UserError(f"--teacher_from_arm {args.teacher_from_arm}: add it to --arms so it is trained first")
        arms.remove(args.teacher_from_arm)
        arms.insert(0, args.teacher_from_arm)
    plans, teacher_plan = [], None
    for arm in arms:
        overrides = arm_overrides(arm) + args.override
        overrides.append(f"train.checkpoint_dir={os.path.join(args.out_dir, arm)}")
        # save_epochs is set from --epochs below; [1] keeps the first load valid whatever num_epochs is.
        cfg = load_config(args.data_config, args.train_config, args.model_config, overrides + ["train.save_epochs=[1]"])
        final = cfg.train.num_epochs
        if any(e > final or e < 1 for e in args.epochs):
            raise UserError(f"--epochs {args.epochs}: every epoch must lie in 1..train.num_epochs={final}")
        overrides.append(override_text("train.save_epochs", sorted(set(args.epochs) | {final})))
        if teacher_plan is not None and cfg.train.objective == "distill":
            # The finished supervised student becomes the frozen teacher, at its own input size (6x6 grid -> 6x6).
            overrides += [f"model.teacher_weights={teacher_plan['final_path']}",
                          f"model.teacher_img_size={teacher_plan['cfg'].model.student_img_size}"]
        cfg = load_config(args.data_config, args.train_config, args.model_config, overrides)
        plan = {"arm": arm, "overrides": overrides, "cfg": cfg, "dir": cfg.train.checkpoint_dir,
                "final_path": os.path.join(cfg.train.checkpoint_dir, f"checkpoint_epoch_{final}.pth")}
        if arm == args.teacher_from_arm:
            teacher_plan = plan
        plans.append(plan)
    return plans


# ----------------------------------------------------------------- training
def training_signature(config: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    return {f"{s}.{k}": v for s, values in config.items() for k, v in values.items() if k not in RUN_ONLY_KEYS}


def train_arm(plan: Dict[str, Any], argv_common: List[str]) -> None:
    """Trains one arm unless its final checkpoint exists and was trained with this very config."""
    if os.path.isfile(plan["final_path"]):
        stored = load_checkpoint(plan["final_path"]).get("config") or {}
        if training_signature(stored) != training_signature(plan["cfg"].to_dict()):
            raise UserError(f"{plan['final_path']} was trained with a different config than arm '{plan['arm']}' "
                            f"asks for now; use another --out_dir or move that run away")
        print(f"[{plan['arm']}] final checkpoint exists: skipping training", flush=True)
        return
    print(f"[{plan['arm']}] training into {plan['dir']}", flush=True)
    code = distill_trainer.main(argv_common + ["--override", *plan["overrides"]])
    if code == distill_trainer.EXIT_REQUEUE:
        raise Requeue(f"arm '{plan['arm']}' checkpointed after a stop signal")
    if code != 0:
        raise UserError(f"arm '{plan['arm']}': distill_trainer.py exited with {code} (message above); fix it and "
                        f"rerun: finished arms are skipped")


# ----------------------------------------------------------------- evaluation
def evaluate_arms(plans: List[Dict[str, Any]], args: argparse.Namespace) -> Dict[str, List[Dict[str, Any]]]:
    """Probes every arm; the teacher is probed with the first distill arm, the untrained student with the first arm."""
    results, teacher_done = {}, False
    for i, plan in enumerate(plans):
        with_teacher = not teacher_done and plan["cfg"].train.objective == "distill"
        teacher_done = teacher_done or with_teacher
        epochs = sorted(set(args.epochs) | {plan["cfg"].train.num_epochs})
        results[plan["arm"]] = evaluate_checkpoints.evaluate_run(
            plan["dir"], epochs, eval_teacher=with_teacher, eval_untrained=i == 0, device=args.device,
            batch_size=args.eval_batch_size)
    if args.legacy_dir:
        results["legacy"] = evaluate_checkpoints.evaluate_run(
            args.legacy_dir, None, model_cfg_path=args.model_config, data_cfg_path=args.legacy_data_config,
            device=args.device, linear_probe_C=1.0, batch_size=args.eval_batch_size,
            output_file=os.path.join(args.out_dir, "legacy_eval_results.json"))
    return results


# ----------------------------------------------------------------- report
def rows_from(results: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One flat row per evaluated entry: the arms' checkpoints, then legacy checkpoints, then the baselines."""
    groups = {"arms": [], "legacy": [], "baselines": []}
    for arm, entries in results.items():
        for e in entries:
            baseline = e["kind"] in ("teacher", "untrained")
            d = e["diagnostics"]
            groups["baselines" if baseline else ("legacy" if arm == "legacy" else "arms")].append({
                "arm": e["name"] if baseline else arm, "epoch": e["epoch"], "linear_acc": e["linear_acc"],
                "knn_acc": e["knn_acc"], "fixed_C_acc": e.get("linear_acc_fixed_C"),
                "pairwise_cos": d["pairwise_cos"], "effective_rank": d["effective_rank"],
                "student_teacher_cos": d.get("student_teacher_cos"), "collapsed": bool(d["pairwise_cos"] > COLLAPSE_COS)})
    return groups["arms"] + groups["legacy"] + groups["baselines"]


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| arm | epoch | linear % | kNN % | fixed-C probe % | pairwise cos | eff. rank | cos(Ps,t) | collapsed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['arm']} | {fmt(r['epoch'], 'd')} | {fmt(r['linear_acc'])} | {fmt(r['knn_acc'])} | "
                     f"{fmt(r['fixed_C_acc'])} | {fmt(r['pairwise_cos'], '.3f')} | {fmt(r['effective_rank'], '.1f')} | "
                     f"{fmt(r['student_teacher_cos'], '.3f')} | {fmt(r['collapsed'])} |")
    return "\n".join(lines)


def final_rows(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Each trained arm's last evaluated epoch, and the baselines."""
    out = {}
    for r in rows:
        if r["arm"] != "legacy" and (r["arm"] not in out or (r["epoch"] or 0) >= (out[r["arm"]]["epoch"] or 0)):
            out[r["arm"]] = r
    return out


def verdict(rows: List[Dict[str, Any]], teacher_from_arm: Optional[str]) -> List[str]:
    """The report's conclusions, each sentence computed from the table."""
    final = final_rows(rows)
    untrained, teacher, supervised = final.get("untrained"), final.get("teacher"), final.get("supervised")
    kd_arms = [a for a in final if a.startswith("kd")]
    out = []
    if teacher_from_arm:
        out.append(f"The teacher of the KD arms is the `{teacher_from_arm}` arm's final student, not DINOv2: this "
                   f"checks the method against a real, informative teacher where DINOv2 weights could not be had.")
    for arm in kd_arms:
        r, parts = final[arm], []
        if untrained:
            diff = r["linear_acc"] - untrained["linear_acc"]
            parts.append(f"{'beats' if diff > 0 else 'does not beat'} the untrained student by {diff:+.1f} points "
                         f"({r['linear_acc']:.1f} % vs {untrained['linear_acc']:.1f} %)")
        if teacher:
            parts.append(f"reaches {100 * r['linear_acc'] / max(teacher['linear_acc'], 1e-9):.0f} % of the teacher's "
                         f"{teacher['linear_acc']:.1f} %")
        if supervised:
            parts.append(f"is {r['linear_acc'] - supervised['linear_acc']:+.1f} points from the supervised baseline "
                         f"({supervised['linear_acc']:.1f} %)")
        out.append(f"**{arm}** (epoch {r['epoch']}): linear probe {r['linear_acc']:.1f} %, kNN {r['knn_acc']:.1f} %; "
                   + "; ".join(parts) + ".")
    collapsed = [f"{r['arm']} at epoch {r['epoch']} ({r['pairwise_cos']:.2f})" for r in rows
                 if r["collapsed"] and r["epoch"] is not None]
    out.append(f"Collapse by the seed's criterion (mean pairwise cosine of test features > {COLLAPSE_COS}): "
               + (", ".join(collapsed) if collapsed else "none of the evaluated checkpoints") + ".")
    if "kd" in final and untrained:
        kd_ok = final["kd"]["linear_acc"] > untrained["linear_acc"]
        teacher_note = f" (with the `{teacher_from_arm}` teacher)" if teacher_from_arm else ""
        out.append(f"Answer: trained on CIFAR-10 itself, the default KD method{teacher_note} " + (
            "beats the untrained student, unlike the earlier 11–13 % runs: training-distribution mismatch (or the "
            "earlier probe: " + ("see below" if any(r["arm"] == "legacy" for r in rows) else
                                 "re-probe those checkpoints with --legacy_dir") +
            ") is a plausible cause of the earlier result." if kd_ok else
            "still does not beat the untrained student: the distribution mismatch alone does not explain the earlier "
            "result; look at the pipeline and objective (see the other arms)."))
    out += legacy_verdict(rows)
    return out


def legacy_verdict(rows: List[Dict[str, Any]]) -> List[str]:
    legacy = [r for r in rows if r["arm"] == "legacy" and r["fixed_C_acc"] is not None]
    if not legacy:
        return []
    gaps = [r["linear_acc"] - r["fixed_C_acc"] for r in legacy]
    best = max(legacy, key=lambda r: r["linear_acc"])
    source = ("the probe: standardized, validated regularization recovers far more than C = 1 on L2-normalized "
              "features" if max(gaps) > 10 else "the weights: the trustworthy probe agrees with the fixed-C probe")
    return [f"Earlier checkpoints: trustworthy probe up to {best['linear_acc']:.1f} % vs fixed C = 1 probe "
            f"{best['fixed_C_acc']:.1f} % (largest gap {max(gaps):+.1f} points): the old low number came from {source}."]


def loss_curves(plans: List[Dict[str, Any]]) -> Dict[str, List[List[float]]]:
    curves = {}
    for plan in plans:
        path = os.path.join(plan["dir"], "log.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                records = [json.loads(line) for line in f if line.strip()]
            curves[plan["arm"]] = [[r["epoch"], r["loss"]] for r in records if r.get("loss") is not None]
    return curves


def plot_report(rows: List[Dict[str, Any]], curves: Dict[str, List[List[float]]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    arms = list(dict.fromkeys(r["arm"] for r in rows if r["epoch"] is not None and r["arm"] != "legacy"))
    colour = {arm: f"C{i}" for i, arm in enumerate(arms)}  # one colour per arm in both panels
    for arm in arms:
        pts = sorted((r["epoch"], r["linear_acc"]) for r in rows if r["arm"] == arm)
        ax_acc.plot(*zip(*pts), marker="o", label=arm, color=colour[arm])
    for r in rows:
        if r["epoch"] is None:
            ax_acc.axhline(r["linear_acc"], linestyle="--", color="gray" if r["arm"] == "untrained" else "black",
                           label=r["arm"])
    ax_acc.set(xlabel="epoch", ylabel="linear probe top-1 (%)", title="linear probe vs epoch")
    for arm, pts in curves.items():
        if pts:
            ax_loss.plot(*zip(*pts), label=arm, color=colour.get(arm))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss (log.jsonl)")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(plans, results, args) -> str:
    rows = rows_from(results)
    conclusions = verdict(rows, args.teacher_from_arm)
    curves = loss_curves(plans)
    plot_report(rows, curves, os.path.join(args.out_dir, "report.png"))
    meta = run_metadata()
    text = "\n\n".join([
        "# Experiment report",
        f"Arms: {', '.join(p['arm'] for p in plans)}; evaluated epochs: {', '.join(map(str, args.epochs))}. "
        f"Linear probe: standardized features, regularization chosen on a held-out 10 % of train; kNN: k = 20, "
        f"T = 0.07. Collapse: mean pairwise cosine of test features > {COLLAPSE_COS}.",
        markdown_table(rows),
        "## Verdict", "\n".join(f"- {c}" for c in conclusions),
        "![accuracy and loss](report.png)",
    ]) + "\n"
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out_dir, "report.json"), "w") as f:
        json.dump({"rows": rows, "verdict": conclusions, "loss_curves": curves, "meta": meta}, f, indent=1)
    return text


# ----------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", nargs="+", default=None, help="default: all of configs/experiments/")
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 10, 20, 50], help="epochs to save and probe")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="applied to every arm, after the arm's own file")
    p.add_argument("--out_dir", default="experiments")
    p.add_argument("--data_config", default=os.path.join(HERE, DEFAULT_FILES["data"]))
    p.add_argument("--train_config", default=os.path.join(HERE, DEFAULT_FILES["train"]))
    p.add_argument("--model_config", default=os.path.join(HERE, DEFAULT_FILES["model"]))
    p.add_argument("--teacher_from_arm", default=None, help="use this arm's final student as the KD arms' teacher")
    p.add_argument("--legacy_dir", default=None, help="earlier run's checkpoints (seed format) to re-probe")
    p.add_argument("--legacy_data_config", default=None, help="data config for the legacy probe (default: the repo's)")
    p.add_argument("--device", default=None)
    p.add_argument("--eval_batch_size", type=int, default=256)
    p.add_argument("--dry_run", action="store_true", help="print each arm's trainer arguments and stop")
    args = p.parse_args(argv)
    args.arms = args.arms or available_arms()
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        plans = plan_arms(args)
        common = ["--data_config", args.data_config, "--train_config", args.train_config,
                  "--model_config", args.model_config]
        if args.dry_run:
            for plan in plans:
                print(f"{plan['arm']}: " + " ".join(common + ["--override"] + [f"'{o}'" for o in plan["overrides"]]))
            return 0
        os.makedirs(args.out_dir, exist_ok=True)
        for plan in plans:
            train_arm(plan, common)
        results = evaluate_arms(plans, args)
        print("\n" + write_report(plans, results, args), flush=True)
    except Requeue as e:
        print(f"{e}: exiting with {distill_trainer.EXIT_REQUEUE}; rerun the same command to continue", flush=True)
        return distill_trainer.EXIT_REQUEUE
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
