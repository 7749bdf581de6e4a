"""The experiment report's sentences, each read from paired contrasts (stats.compare_arms) on
per-image predictions: the power gate, the question's contrasts P, D, L (or J), one Answer, then
descriptive contrasts.

    arms = verdict.final_arms(rows)                 # rows as run_experiments.rows_from makes them
    lines = verdict.conclusions(arms, verdict.Context(margin=2.0, teacher_of={"kd": "teacher@224"}))

The decision table (docs/experiments.md) in code:
  power gate: kd and supervised each `higher` than the untrained student, else no cause is drawn;
  P  probe:    earlier checkpoints, validated probe - earlier probe (same weights; read only when
  the earlier
               probe reproduces the earlier figure);
  D  data:     kd - kd_transfer (step-matched);
  L  pipeline: kd_transfer - legacy;
  J  joint:    kd - legacy, only without kd_transfer (data and pipeline confounded);
intervals Bonferroni-adjusted for the three contrasts. Any `inconclusive` contrast: "cannot tell
yet" with the seeds that would resolve it; otherwise the causes are the contrasts that read
`higher`. Only the Answer names a cause; every other sentence states contrasts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import stats
from metrics import COLLAPSE_COS, COLLAPSE_MIN_RANK

PRIMARY = "linear_acc"  # validated linear probe on the CLS token
EARLIER_PROBE = (
    "fixed_C_acc"  # L2-normalized CLS, LogisticRegression C = 1: the earlier evaluation's probe
)
FAMILY = 3  # P, D, L: the pre-registered contrasts the adjustment is for
LEVEL = 0.95
TRANSFER_ARM, LOWRES_ARM = "kd_transfer", "kd_transfer_lowres"
BASELINES = ("untrained",)
CAUSES = {
    "P": "the earlier probe",
    "D": "the training data",
    "L": "the earlier pipeline",
    "J": "the joint change of data and pipeline (confounded: --transfer_root separates them)",
}
NAMES = {
    "P": "P (probe: earlier checkpoints, validated - earlier probe)",
    "D": f"D (data: kd - {TRANSFER_ARM})",
    "L": f"L (pipeline: {TRANSFER_ARM} - legacy)",
    "J": "J (data and pipeline together: kd - legacy)",
}
WHAT_IT_NEEDS = {
    "P": "--legacy_dir",
    "D": "--transfer_root",
    "L": "--transfer_root and --legacy_dir",
}


@dataclass
class Arm:
    """One row of the report (an arm, a legacy run or a baseline) at its last evaluated epoch, all
    its runs."""

    label: str
    epoch: Optional[int]
    seeds: List[Optional[int]]
    accuracy: Dict[str, List[float]]  # probe key -> per run %
    correct: Dict[str, np.ndarray] = field(
        default_factory=dict
    )  # probe key -> [runs, test images] 0/1
    test_id: Optional[str] = None
    num_classes: Optional[int] = None
    num_test: Optional[int] = None


@dataclass
class Context:
    margin: float = 2.0
    legacy_figure: Tuple[float, float] = (11.0, 13.0)
    teacher_of: Dict[str, str] = field(default_factory=dict)  # KD arm -> its teacher's row label
    teacher_from_arm: Optional[str] = None
    random_teacher: bool = False
    transfer_note: Optional[str] = None  # how kd_transfer was matched to kd (--transfer_match)
    label_arms: Sequence[str] = ()  # arms trained on the labels (supervised, kd_plus_ce)
    flags: Dict[str, bool] = field(
        default_factory=dict
    )  # transfer_root, legacy_dir, legacy_cifar_dir given


# ----------------------------------------------------------------- arms from rows
def final_arms(rows: Sequence[Dict[str, Any]]) -> Dict[str, Arm]:
    """Each row label's last epoch (baselines: epoch None), its runs in seed order."""
    last: Dict[str, Any] = {}
    for r in rows:
        if r["arm"] not in last or (r["epoch"] or 0) > (last[r["arm"]] or 0):
            last[r["arm"]] = r["epoch"]
    arms = {}
    for label, epoch in last.items():
        runs = sorted(
            (r for r in rows if r["arm"] == label and r["epoch"] == epoch),
            key=lambda r: -1 if r["seed"] is None else r["seed"],
        )
        accuracy = {
            key: [r[key] for r in runs]
            for key in (PRIMARY, EARLIER_PROBE, "knn_acc")
            if all(r.get(key) is not None for r in runs)
        }
        ids = {r.get("test_id") for r in runs}
        correct = {}
        if len(ids) == 1 and None not in ids:
            for key in accuracy:
                per_run = [(r.get("correct") or {}).get(key) for r in runs]
                if all(c is not None for c in per_run):
                    correct[key] = np.stack(per_run)
        arms[label] = Arm(
            label,
            epoch,
            [r["seed"] for r in runs],
            accuracy,
            correct,
            ids.pop() if len(ids) == 1 else None,
            runs[0].get("num_classes"),
            runs[0].get("num_test"),
        )
    return arms


# ----------------------------------------------------------------- contrasts
def contrast(
    a: Optional[Arm],
    b: Optional[Arm],
    margin: float,
    level: float = LEVEL,
    key: str = PRIMARY,
    key_b: Optional[str] = None,
) -> Dict[str, Any]:
    """compare_arms on two rows' per-image correctness; {"missing": reason} when it cannot be
    computed. Paired by seed when both rows ran the same seeds; key_b: another probe on the same
    runs (paired).
    """
    key_b = key_b or key
    if a is None or b is None:
        return {"missing": "not run"}
    if key not in a.correct or key_b not in b.correct:
        lacking = a.label if key not in a.correct else b.label
        return {
            "missing": f"no per-image predictions for {lacking} (results from before "
            f"eval_predictions.npz: re-evaluate)"
        }
    if a.test_id != b.test_id:
        return {"missing": f"{a.label} and {b.label} were probed on different test images"}
    paired = a.seeds == b.seeds and (None not in a.seeds or a is b)
    c = stats.compare_arms(
        a.correct[key], b.correct[key_b], paired=paired, margin=margin, level=level
    )
    c["seeds"] = len(a.seeds) if paired else max(len(a.seeds), len(b.seeds))
    return c


def word(c: Dict[str, Any]) -> str:
    if c["verdict"] == stats.EQUIVALENT:
        return f"equivalent within ± {c['margin']:g}"
    return c["verdict"]


def said(name: str, c: Dict[str, Any]) -> str:
    """'D (...) +1.0 [-0.8, +2.8] points: inconclusive (5 vs 5 runs, paired by seed)'."""
    if "missing" in c:
        return f"{name}: not computed ({c['missing']})"
    runs = f"{c['n_a']} vs {c['n_b']} runs, {'paired by seed' if c['paired'] else 'unpaired'}"
    return f"{name} {c['diff']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}] points: {word(c)} ({runs})"


def resolve_hint(c: Dict[str, Any], margin: float) -> str:
    """How many seeds per arm would resolve a difference of margin at the seed variance seen."""
    n = stats.seeds_needed(c, margin)
    if n is not None:
        return (
            f"about {n} seeds per arm would resolve a difference of ± {margin:g} at the seed "
            f"variance seen"
        )
    if c["run_var"] <= 0:
        return "no run-to-run variance could be seen (one run per arm): rerun with --seeds 0 1 2"
    return (
        f"no number of seeds resolves ± {margin:g} on {c['num_test']} test images (their "
        f"part of the interval alone is too wide): probe on more test images"
    )


# ----------------------------------------------------------------- the earlier figure
def legacy_check(arm: Optional[Arm], figure: Tuple[float, float]) -> Tuple[Optional[str], str]:
    """('reproduced' | 'at chance' | 'not reproduced' | None, sentence): does the earlier probe on
    the earlier checkpoints give the earlier figure? A window or a result that includes chance
    reproduces nothing.
    """
    if arm is None or EARLIER_PROBE not in arm.accuracy:
        return None, ""
    acc = arm.accuracy[EARLIER_PROBE][-1]
    lo, hi = stats.wilson_interval(acc, arm.num_test or 1)
    chance = 100.0 / arm.num_classes if arm.num_classes else None
    window = f"{figure[0]:g}–{figure[1]:g} %"
    measured = f"{acc:.1f} % [{lo:.1f}, {hi:.1f}] (epoch {arm.epoch})"
    head = f"Legacy check: the earlier probe on the earlier checkpoints gives {measured}"
    if chance is not None and figure[0] <= chance <= figure[1]:
        return "window at chance", (
            f"{head}; the window --legacy_figure {window} contains chance "
            f"({chance:g} %), so it cannot show a reproduction: P is not read."
        )
    if chance is not None and lo <= chance <= hi:
        return "at chance", (
            f"{head}: at chance ({chance:g} %), not a reproduction of {window}: " f"P is not read."
        )
    if hi < figure[0] or lo > figure[1]:
        return "not reproduced", (
            f"{head}, outside the earlier figure {window}: this evaluation does "
            f"not reproduce the earlier one, so P is not read."
        )
    return "reproduced", f"{head}, which reproduces the earlier figure ({window}): P is read."


# ----------------------------------------------------------------- the decision table
def question_contrasts(
    arms: Dict[str, Arm], ctx: Context, level: float
) -> Tuple[Dict[str, Dict[str, Any]], List[str]]:
    """{P, D, L or J: contrast} on the primary probe at the family level, and the sentences that
    state them."""
    legacy, transfer, kd = arms.get("legacy"), arms.get(TRANSFER_ARM), arms.get("kd")
    status, check = legacy_check(legacy, ctx.legacy_figure)
    out: Dict[str, Dict[str, Any]] = {}
    lines = [check] if check else []
    if status == "reproduced":
        out["P"] = contrast(legacy, legacy, ctx.margin, level, PRIMARY, EARLIER_PROBE)
    elif legacy is not None:
        out["P"] = {
            "missing": (
                "the earlier probe does not reproduce the earlier figure"
                if status
                else "the earlier probe was not run on the earlier checkpoints"
            )
        }
    if transfer is not None:
        out["D"] = contrast(kd, transfer, ctx.margin, level)
        if legacy is not None:
            out["L"] = contrast(transfer, legacy, ctx.margin, level)
    elif legacy is not None:
        out["J"] = contrast(kd, legacy, ctx.margin, level)
    lines += [said(NAMES[k], c) + "." for k, c in out.items()]
    return out, lines


def power_gate(
    arms: Dict[str, Arm], margin: float, level: float
) -> Tuple[Optional[bool], Dict[str, Dict[str, Any]], str]:
    """(passed or None when it cannot be run, its contrasts, the sentence)."""
    untrained = arms.get("untrained")
    gate = {arm: contrast(arms.get(arm), untrained, margin, level) for arm in ("kd", "supervised")}
    parts = "; ".join(said(f"{arm} - untrained", c) for arm, c in gate.items())
    if any("missing" in c for c in gate.values()):
        return None, gate, f"Power gate: cannot be run: {parts}."
    passed = all(c["verdict"] == stats.HIGHER for c in gate.values())
    return passed, gate, f"Power gate ({'passed' if passed else 'failed'}): {parts}."


def answer(
    gate: Optional[bool],
    gate_contrasts: Dict[str, Dict[str, Any]],
    found: Dict[str, Dict[str, Any]],
    margin: float,
) -> str:
    """The one Answer sentence of the decision table."""
    if gate is None:
        missing = [arm for arm in ("kd", "supervised") if "missing" in gate_contrasts[arm]]
        return (
            f"Answer: no cause can be drawn: the power gate needs the kd and supervised arms and "
            f"the untrained student with per-image predictions (not computed for: "
            f"{', '.join(missing)})."
        )
    if not gate:
        return (
            "Answer: no cause can be drawn: the training is too short or too small to answer the "
            "question (the power gate needs kd and supervised each higher than the untrained "
            "student; see the power gate above)."
        )
    computed = {k: c for k, c in found.items() if "missing" not in c}
    untested = [
        f"{NAMES[k].split(' (')[0]} ({c['missing']})" for k, c in found.items() if "missing" in c
    ]
    untested += [
        f"{k} (needs {WHAT_IT_NEEDS[k]})"
        for k in ("P", "D", "L")
        if k not in found and not (k == "D" and "J" in found)
    ]
    limits = f"; not tested: {', '.join(untested)}" if untested else ""
    if not computed:
        return (
            f"Answer: no cause can be drawn yet: no contrast of the question was computed{limits}."
        )
    open_ = {k: c for k, c in computed.items() if c["verdict"] == stats.INCONCLUSIVE}
    rests = ", ".join(
        f"{k} {c['diff']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}] {word(c)}"
        for k, c in computed.items()
    )
    if open_:
        unknown = "; ".join(
            f"{NAMES[k]} {c['diff']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}] with "
            f"{c['seeds']} seed{'s' if c['seeds'] != 1 else ''}: "
            f"{resolve_hint(c, margin)}"
            for k, c in open_.items()
        )
        return (
            f"Answer: cannot tell yet: {unknown}. No cause is drawn until every contrast is "
            f"resolved (contrasts: {rests}){limits}."
        )
    causes = [CAUSES[k] for k, c in computed.items() if c["verdict"] == stats.HIGHER]
    others = [CAUSES[k] for k, c in computed.items() if c["verdict"] != stats.HIGHER]
    if causes:
        rest = f", not by {' nor by '.join(others)}" if others else ""
        return (
            f"Answer: the earlier low result is explained by {' and by '.join(causes)}{rest} "
            f"(rests on {rests}){limits}."
        )
    return (
        f"Answer: none of the tested changes explains the earlier low result (not "
        f"{' nor '.join(others)}; rests on {rests}){limits}."
    )


# ----------------------------------------------------------------- the report's sentences
def header(arms: Dict[str, Arm], ctx: Context, level: float) -> List[str]:
    num_test = {a.num_test for a in arms.values() if a.num_test}
    seeds = sorted({s for a in arms.values() for s in a.seeds if s is not None})
    out = []
    if ctx.random_teacher:
        out.append(
            "**The teacher is randomly initialised** (model.teacher_pretrained=false, no weights): "
            "these numbers test the pipeline only, not the method; no Answer is given."
        )
    out.append(
        f"Margin ± {ctx.margin:g} points (--margin: the smallest difference that matters); seeds: "
        f"{', '.join(map(str, seeds)) or 'one run per arm'}; test images: "
        f"{', '.join(map(str, sorted(num_test))) or '?'}. Intervals: mean difference of two arms "
        f"on the same test images, widened for which seeds ran (Student t over the per-seed "
        f"differences, paired by seed when both arms ran the same seeds) and which test images "
        f"were drawn (normal, per image); the question's contrasts at {100 * level:.4g} % "
        f"(95 % Bonferroni-adjusted for {FAMILY}), descriptive ones at 95 %. Words: higher / "
        f"lower (the interval excludes 0), equivalent within ± {ctx.margin:g} (it lies inside "
        f"the margin: checked first), else inconclusive."
    )
    if ctx.transfer_note:
        out.append(ctx.transfer_note)
    if ctx.teacher_from_arm:
        out.append(
            f"The teacher of the KD arms is the `{ctx.teacher_from_arm}` arm's final student (the "
            f"same seed's), not DINOv2: this checks the method against a real, informative "
            f"teacher where DINOv2 weights could not be had."
        )
    return out


def conclusions(arms: Dict[str, Arm], ctx: Context) -> List[str]:
    """Header, power gate, the question's contrasts, the Answer (none for a random teacher), what
    the missing flags would add, then the descriptive contrasts and collapse counts."""
    level = 1 - (1 - LEVEL) / FAMILY
    out = header(arms, ctx, level)
    gate, gate_contrasts, gate_line = power_gate(arms, ctx.margin, level)
    found, lines = question_contrasts(arms, ctx, level)
    out += [gate_line] + lines
    if not ctx.random_teacher:
        out.append(answer(gate, gate_contrasts, found, ctx.margin))
    out += missing_flags(arms, ctx)
    out += descriptive(arms, ctx)
    return out


def missing_flags(arms: Dict[str, Arm], ctx: Context) -> List[str]:
    out = []
    if TRANSFER_ARM not in arms:
        joint = " (J above is kd - legacy: their joint effect)" if "legacy" in arms else ""
        out.append(
            f"Without --transfer_root the training data and the pipeline are confounded{joint}; "
            f"it adds the {TRANSFER_ARM} arm: D and, with --legacy_dir, L."
        )
    if "legacy" not in arms:
        out.append(
            "Without --legacy_dir there is no earlier run to re-probe: it adds P (after the check "
            "that the earlier probe reproduces --legacy_figure) and L (or J)."
        )
    if "legacy_cifar" not in arms and ("legacy" in arms or TRANSFER_ARM in arms):
        out.append(
            "Without --legacy_cifar_dir the 2x2's old pipeline x CIFAR-10 cell stays empty (it "
            "adds descriptive contrasts only)."
        )
    return out


def descriptive(arms: Dict[str, Arm], ctx: Context) -> List[str]:
    """Every trained arm vs the untrained student, the supervised baseline, its teacher and kd, and
    the earlier probe on its own weights; kd_transfer_lowres vs kd_transfer; the old pipeline's
    cells.
    """
    out = ["Descriptive contrasts (95 %, not adjusted, not part of the Answer):"]
    baselines = {label for label in arms if label in BASELINES or label.startswith("teacher")}
    for label, arm in arms.items():
        if label in baselines:
            continue
        parts = [f"linear probe {described(arm)}"]
        for other in ("untrained", "supervised", ctx.teacher_of.get(label), "kd"):
            if other and other != label and other in arms:
                parts.append(said(f"- {other}", contrast(arm, arms[other], ctx.margin)))
        teacher = arms.get(ctx.teacher_of.get(label) or "")
        if teacher is not None and teacher.accuracy.get(PRIMARY):
            share = 100 * mean(arm.accuracy[PRIMARY]) / max(mean(teacher.accuracy[PRIMARY]), 1e-9)
            parts.append(f"{share:.0f} % of {teacher.label}'s {described(teacher)}")
        if EARLIER_PROBE in arm.accuracy:
            parts.append(
                said(
                    "validated - earlier probe on the same weights",
                    contrast(arm, arm, ctx.margin, key_b=EARLIER_PROBE),
                )
            )
        runs = len(arm.seeds)
        labels = ", USES LABELS" if label in ctx.label_arms else ""
        out.append(
            f"**{label}** (epoch {arm.epoch}, {runs} run{'s' if runs > 1 else ''}{labels}): "
            + "; ".join(parts)
            + "."
        )
    pairs = [
        (
            LOWRES_ARM,
            TRANSFER_ARM,
            "image content vs native 96 px: kd_transfer_lowres - kd_transfer",
        ),
        ("kd", "legacy_cifar", "pipeline on CIFAR-10: kd - legacy_cifar"),
        ("legacy_cifar", "legacy", "data in the old pipeline: legacy_cifar - legacy"),
    ]
    for a, b, name in pairs:
        if a in arms and b in arms:
            out.append(said(name, contrast(arms[a], arms[b], ctx.margin)) + ".")
    return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def described(arm: Arm, key: str = PRIMARY) -> str:
    values = arm.accuracy[key]
    lo, hi = stats.accuracy_interval(values, arm.num_test or 1)
    return f"{mean(values):.1f} % [{lo:.1f}, {hi:.1f}]"


# ----------------------------------------------------------------- the 2x2 and collapse
TWO_BY_TWO = {
    ("old pipeline", "other data"): ("legacy", "--legacy_dir"),
    ("old pipeline", "CIFAR-10"): ("legacy_cifar", "--legacy_cifar_dir"),
    ("this pipeline", "other data"): (TRANSFER_ARM, "--transfer_root"),
    ("this pipeline", "CIFAR-10"): ("kd", "--arms kd"),
}


def two_by_two_table(arms: Dict[str, Arm]) -> Optional[str]:
    """{old, this pipeline} x {other data, CIFAR-10}, final checkpoints, probed on CIFAR-10; None
    when no cell of the other data or the old pipeline was asked for. Its contrasts are D, L (or J)
    above.
    """
    if not any(arm in arms for arm in ("legacy", "legacy_cifar", TRANSFER_ARM)):
        return None
    lines = ["| pipeline \\ training data | other data | CIFAR-10 |", "|---|---|---|"]
    for pipeline in ("old pipeline", "this pipeline"):
        cells = []
        for data in ("other data", "CIFAR-10"):
            label, flag = TWO_BY_TWO[(pipeline, data)]
            arm = arms.get(label)
            fixed = (
                f"; earlier probe {mean(arm.accuracy[EARLIER_PROBE]):.1f} %"
                if arm and EARLIER_PROBE in arm.accuracy
                else ""
            )
            cells.append(f"{label}: {described(arm)}{fixed}" if arm else f"missing (pass {flag})")
        lines.append(f"| {pipeline} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def collapse_sentences(summary: List[Dict[str, Any]]) -> List[str]:
    def listed(key: str) -> str:
        hits = [
            f"{s['arm']} at epoch {s['epoch']} ({s[key]}/{s['n']})"
            for s in summary
            if s[key] and s["epoch"] is not None
        ]
        return ", ".join(hits) if hits else "none of the evaluated checkpoints"

    return [
        f"Collapse (centered: effective rank of the test features around their mean < "
        f"{COLLAPSE_MIN_RANK}): {listed('collapsed')}.",
        f"Collapse by the legacy criterion (uncentered mean pairwise cosine > {COLLAPSE_COS}; a "
        f"narrow cone of still separable features counts here): {listed('collapsed_legacy_cos')}.",
    ]
