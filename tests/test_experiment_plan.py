"""run_experiments' planning for the verdict: folder arms step-matched to kd (--transfer_match), the
low-res transfer arm at 32 px, the legacy re-probe built from the same config layers as every arm,
the report figure.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import report
import run_experiments as rx
from helpers import CLASSES, TINY_VIT, class_image, override_text, tiny_overrides


def transfer_folder(root, n=200, size=96) -> str:
    rng = np.random.default_rng(3)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        Image.fromarray(class_image(i % len(CLASSES), rng, size=size)).save(
            os.path.join(root, f"{i:03d}.png")
        )
    return str(root)


def plan(tmp_path, synthetic_root, *flags, arms=("kd", "kd_transfer", "kd_transfer_lowres")):
    overrides = [
        o
        for o in tiny_overrides(synthetic_root, "unused")
        if not o.startswith("train.checkpoint_dir")
    ]
    args = rx.parse_args(
        [
            "--arms",
            *arms,
            "--epochs",
            "2",
            "--out_dir",
            str(tmp_path / "exp"),
            "--transfer_root",
            transfer_folder(tmp_path / "transfer"),
            *flags,
            "--override",
            *overrides,
        ]
    )
    return {p["arm"]: p["cfg"] for p in rx.plan_arms(args)}


def test_folder_arms_get_kd_steps_and_warmup_by_default(tmp_path, synthetic_root):
    cfgs = plan(tmp_path, synthetic_root)
    kd_steps = 96 // 16  # the synthetic train split: 4 classes x 24 images, batch 16
    assert cfgs["kd"].train.max_steps_per_epoch is None
    for arm in ("kd_transfer", "kd_transfer_lowres"):
        train = cfgs[arm].train
        assert train.max_steps_per_epoch == kd_steps  # 200 images would give 12 steps per epoch
        assert (train.num_epochs, train.warmup_epochs) == (
            cfgs["kd"].train.num_epochs,
            cfgs["kd"].train.warmup_epochs,
        )
    assert list(cfgs) == ["kd", "kd_transfer", "kd_transfer_lowres"]


def test_epoch_matching_keeps_the_folder_epochs(tmp_path, synthetic_root):
    cfgs = plan(tmp_path, synthetic_root, "--transfer_match", "epochs")
    assert cfgs["kd_transfer"].train.max_steps_per_epoch is None


def test_lowres_arm_stores_the_folder_at_32_px_whatever_the_transfer_size(tmp_path, synthetic_root):
    cfgs = plan(tmp_path, synthetic_root, "--transfer_source_size", "96")
    assert cfgs["kd_transfer_lowres"].data.source_size == 32
    assert cfgs["kd_transfer"].data.source_size == 96
    assert cfgs["kd_transfer_lowres"].data.dataset_root == os.path.abspath(tmp_path / "transfer")


def test_folder_arms_without_transfer_root_leave_the_default_arm_list(tmp_path):
    arms = rx.arm_list(rx.parse_args(["--out_dir", str(tmp_path)]))
    assert "kd_transfer" not in arms and "kd_transfer_lowres" not in arms and "kd" in arms


def test_legacy_reprobe_takes_its_architecture_from_the_overrides(tmp_path, monkeypatch):
    """Legacy checkpoints store no config: their model is the config files with --override, as every
    arm's."""
    seen = []
    monkeypatch.setattr(rx.ev, "evaluate_run", lambda opts: seen.append(opts) or [])
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    args = rx.parse_args(
        [
            "--legacy_dir",
            str(legacy),
            "--out_dir",
            str(tmp_path),
            "--override",
            override_text("model.student_kwargs", TINY_VIT),
            "model.student_img_size=24",
            "data.image_size=24",
        ]
    )
    rx.evaluate_arms([], args, rx.base_config(args))
    assert seen[0].model.student_kwargs == TINY_VIT and seen[0].model.student_img_size == 24


def test_report_figure_has_intervals_outside_legends_and_one_loss_axis_per_objective():
    series = {
        "kd": [(1, 30.0, 28.0, 32.0), (2, 40.0, 38.5, 41.5)],
        "supervised": [(1, 35.0, 33.0, 37.0), (2, 50.0, 48.0, 52.0)],
    }
    fig = report.experiment_figure(
        series,
        {"untrained": (20.0, 19.0, 21.0)},
        {"kd": [(1, 0.9), (2, 0.7)], "supervised": [(1, 2.2), (2, 1.6)]},
        {"kd": "distill", "supervised": "supervised"},
        "t",
    )
    FigureCanvasAgg(fig).draw()
    accuracy, kd_loss, ce_loss = fig.axes
    assert len(accuracy.containers) == 2  # error bars: each arm's 95 % interval per epoch
    (x, low), (_, high) = accuracy.containers[0].lines[2][0].get_segments()[1]
    assert (low, high) == (38.5, 41.5) and 1.9 < x < 2.0  # epoch 2, set beside the other arm's bar
    assert [line.get_label() for line in kd_loss.lines] == [
        "kd"
    ]  # 1 - cos and cross-entropy: own axes
    assert [line.get_label() for line in ce_loss.lines] == ["supervised"]
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1  # beside the plot: covers no line
