"""The decision table row by row, from synthetic per-image predictions: the power gate, P / D / L
(or J), the one Answer sentence, the issue's cases (a)-(e), no two sentences naming different
causes, teacher rows per teacher, intervals within [0, 100], and the runner's flags that feed the
table."""

from __future__ import annotations

import itertools
import re
import zlib

import numpy as np
import pytest

import run_experiments as rx
import stats
import verdict
from config import UserError

NUM_TEST = 10000
FIVE = [0.1, -0.1, 0.0, 0.2, -0.2]  # per-seed offsets: a 0.4-point spread


def runs(label, accs, epoch=2, seeds=None, fixed=None, num_test=NUM_TEST, test_id="cifar-test"):
    """Rows as run_experiments.rows_from makes them, one per accuracy, each with exactly that share
    of correct test images at random places (seeded by the label and run)."""
    rows = []
    seeds = list(range(len(accs))) if seeds is None else seeds
    for i, acc in enumerate(accs):
        rng = np.random.default_rng(zlib.crc32(f"{label}/{i}".encode()))
        correct = {"linear_acc": exact(rng, acc, num_test)}
        if fixed is not None:
            correct["fixed_C_acc"] = exact(rng, fixed[i], num_test)
        rows.append(
            {
                "arm": label,
                "seed": seeds[i],
                "epoch": epoch,
                "linear_acc": acc,
                "linear_acc_cls_patch": acc,
                "knn_acc": acc,
                "fixed_C_acc": None if fixed is None else fixed[i],
                "num_test": num_test,
                "num_classes": 10,
                "test_id": test_id,
                "correct": correct,
                "pairwise_cos": 0.5,
                "effective_rank": 10.0,
                "student_teacher_cos": None,
                "collapsed": False,
                "collapsed_legacy_cos": False,
            }
        )
    return rows


def exact(rng, acc, num_test):
    correct = np.zeros(num_test, dtype=bool)
    correct[rng.permutation(num_test)[: int(round(acc * num_test / 100))]] = True
    return correct


def around(acc, offsets=FIVE):
    return [acc + o for o in offsets]


def gate_arms(n=5, kd=60.0):
    offsets = FIVE[:n]
    return (
        runs("kd", around(kd, offsets))
        + runs("supervised", around(70.0, offsets))
        + runs("untrained", around(30.0, offsets), epoch=None)
    )


def legacy(validated=12.0, earlier=12.0):
    return runs("legacy", [validated], epoch=50, seeds=[None], fixed=[earlier])


def report(*groups, **context):
    rows = [r for g in groups for r in g]
    return verdict.conclusions(verdict.final_arms(rows), verdict.Context(**context))


def the(lines, start):
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


CAUSE_WORDS = re.compile(r"explained by|explains|caused by|came from|because of")


def causes_named(line):
    return {
        k
        for k, cause in verdict.CAUSES.items()
        if re.search(rf"by {re.escape(cause)}(?! nor| \()", line.split(" (rests on")[0])
        and f"not by {cause}" not in line
        and f"nor by {cause}" not in line
    }


# ----------------------------------------------------------------- the issue's cases
def test_a_earlier_probe_hid_the_weights():
    """(a) earlier weights 36 % under the validated probe, 12 % under the earlier probe: P
    higher."""
    lines = report(gate_arms(), legacy(validated=36.0, earlier=12.0))
    assert "which reproduces the earlier figure (11–13 %)" in the(lines, "Legacy check:")
    assert re.search(
        r"^P \(probe.*\) \+24\.0 \[\+2\d\.\d, \+2\d\.\d\] points: higher", the(lines, "P (")
    )
    answer = the(lines, "Answer:")
    assert answer.startswith("Answer: the earlier low result is explained by the earlier probe")
    assert (
        "P +24.0" in answer and "J +24.0" in answer
    )  # kd - legacy: the joint effect, no kd_transfer


def test_b_power_gate_fails_and_no_cause_is_drawn():
    """(b) kd 33 % below the untrained 37 %: the training cannot answer the question."""
    lines = report(
        runs("kd", around(33.0)),
        runs("supervised", around(70.0)),
        runs("untrained", around(37.0), epoch=None),
        runs("kd_transfer", around(12.0)),
        legacy(12.0, 12.0),
    )
    assert the(lines, "Power gate").startswith("Power gate (failed): kd - untrained -4.0 [")
    assert the(lines, "Answer:") == (
        "Answer: no cause can be drawn: the training is too short or too small to answer the "
        "question (the power gate needs kd and supervised each higher than the untrained "
        "student; see the power gate above)."
    )


def test_c_pipeline_not_data():
    """(c) kd 60 %, kd_transfer 59.8 %, legacy 12 %, 5 seeds, 10,000 test images."""
    lines = report(gate_arms(), runs("kd_transfer", around(59.8)), legacy())
    assert ": equivalent within ± 2 (5 vs 5 runs, paired by seed)" in the(lines, "D (data")
    assert ": higher (5 vs 1 runs, unpaired)" in the(lines, "L (pipeline")
    answer = the(lines, "Answer:")
    assert answer.startswith(
        "Answer: the earlier low result is explained by the earlier pipeline, not by "
    )
    assert causes_named(answer) == {"L"}


def test_d_data_not_pipeline():
    """(d) kd 60 %, kd_transfer 13 %, legacy 12 %: a 1-point pipeline difference inside the
    margin."""
    lines = report(gate_arms(), runs("kd_transfer", around(13.0)), legacy())
    assert ": equivalent within ± 2" in the(lines, "L (pipeline")
    answer = the(lines, "Answer:")
    assert answer.startswith(
        "Answer: the earlier low result is explained by the training data, not by "
    )
    assert causes_named(answer) == {"D"}


def test_e_two_seeds_one_point_apart_cannot_tell_and_say_how_many_seeds():
    """(e) 2 seeds with a 1-point spread of the per-seed differences."""
    lines = report(
        runs("kd", [60.0, 61.0]),
        runs("supervised", [70.0, 70.5]),
        runs("untrained", [30.0, 30.5], epoch=None),
        runs("kd_transfer", [59.0, 59.0]),
    )
    answer = the(lines, "Answer:")
    match = re.match(
        r"Answer: cannot tell yet: D \(data: kd - kd_transfer\) \+1\.5 \[-\d+\.\d, \+\d+\.\d\] "
        r"with 2 seeds: about (\d+) seeds per arm would resolve a difference of ± 2 at the "
        r"seed variance seen\. No cause is drawn",
        answer,
    )
    assert match and int(match.group(1)) > 2, answer
    assert not causes_named(answer) and "explained by" not in answer


# ----------------------------------------------------------------- the other rows of the table
def test_random_teacher_reports_say_so_first_and_give_no_answer():
    lines = report(gate_arms(), runs("kd_transfer", around(13.0)), legacy(), random_teacher=True)
    assert lines[0].startswith("**The teacher is randomly initialised**")
    assert "test the pipeline only" in lines[0] and "no Answer is given" in lines[0]
    assert not any(line.startswith("Answer:") for line in lines)
    assert not any(CAUSE_WORDS.search(line) for line in lines)


def test_power_gate_that_cannot_run_names_what_is_missing():
    lines = report(runs("kd", around(60.0)), runs("untrained", around(30.0), epoch=None), legacy())
    assert "supervised - untrained: not computed (not run)" in the(
        lines, "Power gate: cannot be run"
    )
    assert the(lines, "Answer:").startswith("Answer: no cause can be drawn: the power gate needs")


def test_no_contrast_of_the_question_names_the_flags():
    answer = the(report(gate_arms()), "Answer:")
    assert answer == (
        "Answer: no cause can be drawn yet: no contrast of the question was computed; not "
        "tested: P (needs --legacy_dir), D (needs --transfer_root), L (needs --transfer_root "
        "and --legacy_dir)."
    )


def test_nothing_explains_it_when_every_contrast_is_equivalent_or_lower():
    lines = report(
        gate_arms(),
        runs("kd_transfer", around(60.0)),
        legacy(validated=59.5, earlier=12.0),
        legacy_figure=(11.0, 13.0),
    )
    answer = the(lines, "Answer:")
    assert answer.startswith(
        "Answer: the earlier low result is explained by the earlier probe"
    )  # P higher
    lines = report(
        gate_arms(),
        runs("kd_transfer", around(60.0)),
        legacy(validated=60.0, earlier=60.0),
        legacy_figure=(59.0, 61.0),
    )
    answer = the(lines, "Answer:")
    assert answer.startswith(
        "Answer: none of the tested changes explains the earlier low result (not "
        "the earlier probe nor the training data nor the earlier pipeline"
    )


@pytest.mark.parametrize(
    "earlier,figure,expected",
    [
        (
            30.0,
            (11.0, 13.0),
            "outside the earlier figure 11–13 %: this evaluation does not reproduce",
        ),
        (10.0, (11.0, 13.0), "at chance (10 %), not a reproduction of 11–13 %"),
        (12.0, (9.0, 13.0), "the window --legacy_figure 9–13 % contains chance (10 %)"),
    ],
)
def test_earlier_probe_that_does_not_reproduce_the_figure_leaves_p_unread(
    earlier, figure, expected
):
    lines = report(gate_arms(), legacy(validated=36.0, earlier=earlier), legacy_figure=figure)
    assert expected in the(lines, "Legacy check:") and "P is not read" in the(
        lines, "Legacy check:"
    )
    assert ": not computed (the earlier probe does not reproduce" in the(lines, "P (probe")
    answer = the(lines, "Answer:")
    assert "the earlier probe" not in answer.split("(rests on")[0]
    assert "not tested: P (the earlier probe does not reproduce the earlier figure)" in answer


def test_chance_window_uses_the_test_set_interval():
    """10.5 % on 10,000 images excludes chance ([9.9, 11.1] does not: 10.3 % is at chance)."""
    at_chance = report(gate_arms(), legacy(validated=36.0, earlier=10.3))
    assert "at chance" in the(at_chance, "Legacy check:")
    lines = report(gate_arms(), legacy(validated=36.0, earlier=10.9), legacy_figure=(10.5, 13.0))
    assert "reproduces the earlier figure" in the(lines, "Legacy check:")


def test_margin_decides_what_is_equivalent():
    groups = (gate_arms(), runs("kd_transfer", around(58.5)), legacy())
    assert ": higher" in the(
        report(*groups), "D (data"
    )  # 1.5 points, shown non-zero, margin 2: not inside
    assert ": equivalent within ± 3" in the(report(*groups, margin=3.0), "D (data")
    assert "Margin ± 3 points" in report(*groups, margin=3.0)[0]


def test_header_states_margin_seeds_test_images_and_method():
    first = report(gate_arms(), legacy())[0]
    assert first.startswith(
        "Margin ± 2 points (--margin: the smallest difference that matters); seeds: 0, "
        "1, 2, 3, 4; test images: 10000. Intervals:"
    )
    assert "98.33 % (95 % Bonferroni-adjusted for 3)" in first


def test_missing_predictions_are_named_not_guessed():
    rows = gate_arms() + runs("kd_transfer", around(13.0))
    for r in rows:
        if r["arm"] == "kd_transfer":
            r["correct"] = {}
    lines = verdict.conclusions(verdict.final_arms(rows), verdict.Context())
    assert ": not computed (no per-image predictions for kd_transfer" in the(lines, "D (data")
    assert the(lines, "Answer:").startswith("Answer: no cause can be drawn yet")


def test_different_test_images_are_not_paired():
    lines = report(gate_arms(), runs("kd_transfer", around(13.0), test_id="other"))
    assert "kd and kd_transfer were probed on different test images" in the(lines, "D (data")


# ----------------------------------------------------------------- every combination
OUTCOMES = {
    stats.HIGHER: (5.0, 3.0, 7.0),
    stats.LOWER: (-5.0, -7.0, -3.0),
    stats.EQUIVALENT: (0.2, -1.0, 1.4),
    stats.INCONCLUSIVE: (1.0, -3.0, 5.0),
    None: None,
}


def fake(outcome):
    diff, lo, hi = OUTCOMES[outcome]
    return {
        "diff": diff,
        "lo": lo,
        "hi": hi,
        "verdict": outcome,
        "margin": 2.0,
        "seeds": 3,
        "level": 0.98,
        "run_var": 4e-4,
        "test_var": 1e-6,
        "flip_var": 0.0,
        "num_test": NUM_TEST,
        "n_a": 3,
        "n_b": 3,
    }


def combinations():
    for p, d, l_ in itertools.product(OUTCOMES, repeat=3):
        found = {k: fake(o) for k, o in (("P", p), ("D", d), ("L", l_)) if o is not None}
        if "D" not in found and "L" in found:
            continue  # L needs kd_transfer, which D has
        yield found
    for p, j in itertools.product(OUTCOMES, [o for o in OUTCOMES if o]):
        yield {**({"P": fake(p)} if p else {}), "J": fake(j)}


def test_every_combination_gives_one_sentence_naming_only_the_higher_contrasts():
    gate = {"kd": fake(stats.HIGHER), "supervised": fake(stats.HIGHER)}
    sentences = {}
    for found in combinations():
        answer = verdict.answer(True, gate, found, margin=2.0)
        assert answer.startswith("Answer: ") and answer.count("Answer:") == 1 and "\n" not in answer
        key = tuple(sorted((k, c["verdict"]) for k, c in found.items()))
        assert sentences.setdefault(answer, key) == key  # distinct combinations, distinct sentences
        if any(c["verdict"] == stats.INCONCLUSIVE for c in found.values()):
            assert answer.startswith("Answer: cannot tell yet: ") and not causes_named(answer)
            assert "seeds per arm would resolve" in answer
        elif found:
            expected = {k for k, c in found.items() if c["verdict"] == stats.HIGHER}
            assert causes_named(answer) == expected, answer
        for k, c in found.items():
            assert (
                f"{k} {c['diff']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}]" in answer
            )  # what it rests on
    assert len(sentences) == len(list(combinations()))


@pytest.mark.parametrize("gate_word", [stats.LOWER, stats.EQUIVALENT, stats.INCONCLUSIVE])
def test_a_failed_gate_overrides_every_combination(gate_word):
    gate = {"kd": fake(gate_word), "supervised": fake(stats.HIGHER)}
    answers = {verdict.answer(False, gate, found, 2.0) for found in combinations()}
    assert len(answers) == 1 and "too short or too small" in answers.pop()


ROWS = {
    "a": lambda: (gate_arms(), legacy(36.0, 12.0)),
    "b": lambda: (
        runs("kd", around(33.0)),
        runs("supervised", around(70.0)),
        runs("untrained", around(37.0), epoch=None),
        runs("kd_transfer", around(12.0)),
        legacy(),
    ),
    "c": lambda: (gate_arms(), runs("kd_transfer", around(59.8)), legacy()),
    "d": lambda: (gate_arms(), runs("kd_transfer", around(13.0)), legacy()),
    "e": lambda: (
        runs("kd", [60.0, 61.0]),
        runs("supervised", [70.0, 70.5]),
        runs("untrained", [30.0, 30.5], epoch=None),
        runs("kd_transfer", [59.0, 59.0]),
    ),
    "none": lambda: (gate_arms(), runs("kd_transfer", around(60.0)), legacy(60.0, 60.0)),
    "no question": lambda: (gate_arms(),),
    "gate missing": lambda: (runs("kd", around(60.0)), runs("untrained", around(30.0), epoch=None)),
    "data and pipeline": lambda: (gate_arms(), runs("kd_transfer", around(30.0)), legacy()),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_no_report_has_two_sentences_naming_causes(row):
    lines = report(*ROWS[row](), teacher_of={"kd": "teacher@224"})
    naming = [line for line in lines if CAUSE_WORDS.search(line)]
    assert len(naming) <= 1 and all(line.startswith("Answer:") for line in naming), naming
    assert sum(line.startswith("Answer:") for line in lines) == 1


# ----------------------------------------------------------------- teachers, intervals, flags
def test_default_arms_give_one_teacher_row_per_distinct_teacher(tmp_path):
    plans = rx.plan_arms(
        rx.parse_args(
            ["--out_dir", str(tmp_path), "--epochs", "1", "--override", "train.num_epochs=1"]
        )
    )
    labels = rx.teacher_labels(plans, rx.parse_args([]))
    by_arm = {p["arm"]: labels.get(id(p)) for p in plans}
    assert by_arm["kd"] == "teacher@224" and by_arm["kd_aligned"] == "teacher@252"
    assert by_arm["supervised"] is None and set(labels.values()) == {"teacher@224", "teacher@252"}
    entry = {
        "kind": "teacher",
        "name": "teacher",
        "epoch": None,
        "linear_acc": 94.0,
        "knn_acc": 90.0,
        "linear_acc_fixed_C": 93.0,
        "num_test": NUM_TEST,
        "diagnostics": {
            "pairwise_cos": 0.1,
            "effective_rank": 50.0,
            "student_teacher_cos": None,
            "collapsed": False,
        },
    }
    results = [
        {"arm": "kd", "seed": 0, "teacher": "teacher@224", "entries": [entry]},
        {
            "arm": "kd_aligned",
            "seed": 0,
            "teacher": "teacher@252",
            "entries": [entry, {**entry, "name": "teacher_direct"}],
        },
    ]
    assert [r["arm"] for r in rx.rows_from(results)] == [
        "teacher@224",
        "teacher@252",
        "teacher_direct@252",
    ]


def test_each_kd_arm_is_measured_against_its_own_teacher():
    lines = report(
        gate_arms(),
        runs("kd_aligned", around(62.0)),
        runs("teacher@224", [80.0], epoch=None),
        runs("teacher@252", [90.0], epoch=None),
        teacher_of={"kd": "teacher@224", "kd_aligned": "teacher@252"},
    )
    assert "75 % of teacher@224's 80.0 %" in the(lines, "**kd**")
    assert "69 % of teacher@252's 90.0 %" in the(lines, "**kd_aligned**")


def test_no_interval_leaves_0_100():
    rows = (
        runs("kd", [99.9, 97.0])
        + runs("untrained", [0.1, 3.0], epoch=None)
        + runs("teacher@224", [94.0, 95.0], epoch=None)
    )
    for s in rx.summarize(rows):
        for key in ("linear_acc", "linear_acc_cls_patch", "knn_acc"):
            assert 0.0 <= s[key]["lo"] <= s[key]["hi"] <= 100.0
    for line in verdict.conclusions(verdict.final_arms(rows), verdict.Context()):
        for lo, hi in re.findall(r"% \[(-?\d+\.\d), (-?\d+\.\d)\]", line):
            assert 0.0 <= float(lo) <= float(hi) <= 100.0, line


def test_teacher_from_a_kd_arm_is_refused(tmp_path):
    args = rx.parse_args(
        [
            "--arms", "kd", "supervised", "--teacher_from_arm", "kd", "--out_dir",
            str(tmp_path),
            "--epochs", "1", "--override", "train.num_epochs=1",
        ]
    )
    with pytest.raises(
        UserError,
        match="--teacher_from_arm kd: that arm distils from the teacher it would "
        "provide.*--teacher_from_arm supervised",
    ):
        rx.plan_arms(args)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--margin", "0"], "--margin: must be > 0"),
        (["--legacy_figure", "13", "11"], "--legacy_figure: expected LO < HI"),
        (["--transfer_match", "images"], "invalid choice: 'images'"),
    ],
)
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        rx.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_every_other_arm_gets_a_descriptive_contrast_with_kd_never_in_the_answer():
    lines = report(
        gate_arms(),
        runs("kd_mse", around(63.0)),
        runs("kd_mlp", around(60.1)),
        runs("kd_transfer", around(13.0)),
        runs("kd_transfer_lowres", around(20.0)),
        legacy(),
    )
    start = lines.index("Descriptive contrasts (95 %, not adjusted, not part of the Answer):")
    assert the(lines, "Answer:") in lines[:start]
    assert re.search(
        r"- kd \+3\.0 \[\+2\.\d, \+3\.\d\] points: higher \(5 vs 5 runs, paired by seed\)",
        the(lines, "**kd_mse**"),
    )
    assert "- kd +0.1 [" in the(lines, "**kd_mlp**") and "equivalent within ± 2" in the(
        lines, "**kd_mlp**"
    )
    assert the(lines, "image content vs native 96 px").startswith(
        "image content vs native 96 px: kd_transfer_lowres - kd_transfer +7.0 ["
    )
    assert "kd_mse" not in the(lines, "Answer:") and "lowres" not in the(lines, "Answer:")


def test_arms_trained_on_labels_are_marked_in_the_descriptive_contrasts():
    """kd_plus_ce answers how much labels add on top of the teacher: its row must say it used them."""
    lines = report(gate_arms(), runs("kd_plus_ce", around(64.0)),
                   label_arms=["kd_plus_ce", "supervised"])
    assert the(lines, "**kd_plus_ce**").startswith("**kd_plus_ce** (epoch")
    assert "USES LABELS" in the(lines, "**kd_plus_ce**") and "USES LABELS" not in the(lines, "**kd**")
    assert "kd_plus_ce" not in the(lines, "Answer:")
