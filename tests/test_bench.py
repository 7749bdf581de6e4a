"""bench.py --smoke (CPU, tiny models): one JSON line with every throughput, the ratios and the environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

RATES = ("reference_img_per_s", "train_step_img_per_s", "teacher_forward_img_per_s", "cached_train_step_img_per_s",
         "cache_build_views_per_s")
RATIOS = ("ratio_b_over_a", "ratio_b_over_c", "ratio_d_over_b")


def run_bench(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_smoke_prints_one_json_line_with_all_fields(tmp_path):
    out_file = tmp_path / "bench.json"
    result = run_bench(["--smoke", "--output", str(out_file)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # stdout carries only the JSON line; progress goes to stderr
    record = json.loads(lines[0])
    assert json.loads(out_file.read_text()) == record
    for key in RATES + RATIOS + ("cache_full_gb", "seconds", "epoch_s", "epoch_end_s", "epoch_img_per_s",
                                 "epoch_over_b", "run50_min_est_live", "run50_min_est_cached"):
        assert isinstance(record[key], float) and record[key] > 0, (key, record[key])
    # A whole epoch of the smoke data (48 images, batch 8) and the 50-epoch estimate built from it.
    assert record["steps_per_epoch"] == 6
    assert record["run50_min_est_live"] == 50 * (record["epoch_s"] + record["epoch_end_s"]) / 60
    assert record["step_mode"] == "eager" and "captured_vs_eager" not in record  # CPU: no CUDA graph
    assert record["ratio_b_over_a"] == record["train_step_img_per_s"] / record["reference_img_per_s"]
    assert record["device"] == "cpu" and record["peak_gpu_mem_gib"] is None and record["gpu"] is None
    assert record["batch_size"] == 8 and record["steps"] > 0 and record["smoke"] is True
    for key in ("python", "torch", "timm", "torchvision", "git_sha"):
        assert isinstance(record[key], str) and record[key]
    assert record["fused_attn"] == {"student": True, "teacher": True}  # timm's F.scaled_dot_product_attention path


@pytest.mark.slow
def test_bad_override_is_one_error_line(tmp_path):
    result = run_bench(["--smoke", "--override", "train.bach_size=8"], tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'batch_size'" in lines[0], result.stderr
