"""scripts/gpu_checks.sh: on a CPU-only machine one line and nothing written; its header states the
stage timeouts the script uses, which fit one 6-minute run, and the files OUT receives (<= 8)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

from helpers import REPO

SCRIPT = os.path.join(REPO, "scripts", "gpu_checks.sh")


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None and torch.cuda.is_available(),
                    reason="a GPU machine")
def test_cpu_only_machine_gets_one_line_and_nothing_written(tmp_path):
    result = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_checks.sh: no CUDA GPU here"), lines
    assert os.listdir(tmp_path) == []


def test_stage_timeouts_fit_six_minutes_as_the_first_line_says():
    text = open(SCRIPT).read()
    limits = [int(n) for n in re.findall(r"\bstage \w+ (\d+) ", text)]
    assert len(limits) == 6
    assert sum(limits) + 5 * len(limits) <= 360  # each kill may take the 5 s grace of timeout -k 5
    said = f"stage timeouts {'+'.join(map(str, limits))} = {sum(limits)} s"
    assert said in text and f"(sum {sum(limits)} s" in text
    stage_list = text[text.index("# Stages"):text.index("# A stage killed")]
    listed = re.findall(r"(\d+) s$", stage_list, re.M)  # the header's stage list, same numbers
    assert [int(n) for n in listed] == limits


def test_out_gets_at_most_eight_files_all_listed_in_the_header():
    text = open(SCRIPT).read()
    count = int(re.search(r"^# OUT receives (\d+) small files:", text, re.M).group(1))
    listed = re.findall(r"^#   (\w+\.\w+) ", text, re.M)
    written = set(re.findall(r'\$OUT/(\w+\.\w+)"', text)) | {"summary.txt"}
    assert count == len(listed) <= 8 and written == set(listed)
