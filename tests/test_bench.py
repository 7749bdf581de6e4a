"""bench.py --smoke (CPU, tiny models): one JSON line with every throughput, the ratios and the
environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import bench
from config import UserError
from helpers import REPO

RATES = (
    "reference_img_per_s", "train_step_img_per_s", "teacher_forward_img_per_s",
    "cached_train_step_img_per_s", "cache_build_views_per_s",
)
RATIOS = ("ratio_b_over_a", "ratio_b_over_c", "ratio_d_over_b")


def run_bench(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_smoke_prints_one_json_line_with_all_fields(tmp_path):
    out_file, parts_file = tmp_path / "bench.json", tmp_path / "parts.jsonl"
    profile_file = tmp_path / "prof.txt"
    result = run_bench(["--smoke", "--output", str(out_file), "--parts", str(parts_file),
                        "--profile", str(profile_file)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    # stdout carries only the JSON line; progress goes to stderr
    assert len(lines) == 1, result.stdout
    record = json.loads(lines[0])
    assert json.loads(out_file.read_text()) == record
    for key in (
        RATES
        + RATIOS
        + (
            "cache_full_gb", "seconds", "epoch_s", "epoch_end_s", "epoch_img_per_s", "epoch_over_b",
            "run50_min_est_live", "run50_min_est_cached",
        )
    ):
        assert isinstance(record[key], float) and record[key] > 0, (key, record[key])
    # A whole epoch of the smoke data (48 images, batch 8) and the 50-epoch estimate built from it.
    assert record["steps_per_epoch"] == 6
    assert record["run50_min_est_live"] == 50 * (record["epoch_s"] + record["epoch_end_s"]) / 60
    assert record["step_mode"] == "eager" and "captured_check" not in record  # CPU: no CUDA graph
    assert record["step_mode_reason"] == "train.cuda_graphs=auto: a CPU run does not capture"
    assert record["captured_ok"] is None and record["capture_error"] is None
    # Each part's figures were appended as measured (a killed bench keeps them), in that order.
    parts = [json.loads(line) for line in parts_file.read_text().splitlines()]
    assert [p["part"] for p in parts][:3] == ["setup", "train_step", "teacher_forward"]
    assert parts[1]["train_step_img_per_s"] == record["train_step_img_per_s"]
    assert {"reference", "epoch", "cache_build", "cached_train_step"} <= {p["part"] for p in parts}
    assert "top 15 of 3 steps" in profile_file.read_text()
    assert (
        record["ratio_b_over_a"] == record["train_step_img_per_s"] / record["reference_img_per_s"]
    )
    assert (
        record["device"] == "cpu" and record["peak_gpu_mem_gib"] is None and record["gpu"] is None
    )
    assert record["batch_size"] == 8 and record["steps"] > 0 and record["smoke"] is True
    for key in ("python", "torch", "timm", "torchvision", "git_sha"):
        assert isinstance(record[key], str) and record[key]
    # timm's F.scaled_dot_product_attention path
    assert record["fused_attn"] == {"student": True, "teacher": True}


@pytest.mark.slow
def test_bad_override_is_one_error_line(tmp_path):
    result = run_bench(["--smoke", "--override", "train.bach_size=8"], tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'batch_size'" in lines[0], result.stderr



@pytest.mark.slow
def test_unwritable_output_fails_in_one_line_before_the_benchmark(tmp_path):
    result = run_bench(["--smoke", "--output", "/nonexistent/x.json"], tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --output /nonexistent/x.json: folder /nonexistent does not "
                               "exist"), result.stderr
    assert result.stdout == ""  # nothing was measured (each part prints a progress line on stderr)


@pytest.mark.parametrize("flag", ["output", "parts", "profile"])
@pytest.mark.parametrize("where,needle", [("missing/x.json", "does not exist; create it"),
                                          (".", "is a folder; name a file in it"),
                                          ("run/log.jsonl", "would overwrite"),
                                          ("bench.md", "must end in")])
def test_every_output_path_is_checked_first(tmp_path, flag, where, needle):
    (tmp_path / "run").mkdir()
    args = bench.parse_args(["--smoke", f"--{flag}", str(tmp_path / where)])
    with pytest.raises(UserError, match=needle) as e:
        bench.check_output_paths(args)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"--{flag} ")


def test_run50_estimates_without_the_cached_part():
    """--no_cached: the live figures alone, no cached estimate made up from missing parts."""
    out = {
        "epoch_img_per_s": 900.0,
        "train_step_img_per_s": 1000.0,
        "epoch_s": 60.0,
        "epoch_end_s": 6.0,
    }
    assert bench.run50_estimates(out) == {"epoch_over_b": 0.9, "run50_min_est_live": 55.0}
    out.update(steps_per_epoch=100, batch_size=10, cached_train_step_img_per_s=2000.0,
               cache_full_build_s_est=120.0)
    # 1000 images: 1 s of steps live, so 59 s of overhead; cached: 0.5 s + 59 s per epoch, + 6 s end
    assert bench.run50_estimates(out)["run50_min_est_cached"] == pytest.approx(
        (120 + 50 * 65.5) / 60
    )
