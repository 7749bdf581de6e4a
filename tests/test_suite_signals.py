"""run_experiments.py outside training: SIGUSR1/SIGTERM while it evaluates or writes the report
exit 75 with a line (the sbatch wrapper requeues on 75); Ctrl-C there was already a
KeyboardInterrupt, exit 130. Subprocesses: the default SIGUSR1 action would end the test process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from helpers import REPO

# The phase's work is replaced by sending the signal: it arrives inside that phase, never outside.
SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import run_experiments as rx
phase, sig, out_dir = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3]
def fire(*args, **kwargs):
    os.kill(os.getpid(), sig)
    time.sleep(60)
rx.train_arm = lambda plan: None
if phase == "evaluate":
    rx.evaluate_arms = fire
else:
    rx.evaluate_arms = lambda *args: []
    rx.write_report = fire
sys.exit(rx.main(["--arms", "supervised", "--epochs", "1", "--out_dir", out_dir]))
"""

CASES = [("evaluate", "SIGUSR1", 75, "stopped by SIGUSR1 while evaluating"),
         ("report", "SIGTERM", 75, "stopped by SIGTERM while writing the report")]


@pytest.mark.slow
def test_stop_signals_outside_training_exit_75_or_130_with_a_line(tmp_path):
    script = tmp_path / "suite.py"
    script.write_text(SCRIPT.format(repo=REPO))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), phase, sig, str(tmp_path / f"out{i}")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, (phase, sig, _, _) in enumerate(CASES)]
    for proc, (phase, sig, code, needle) in zip(procs, CASES):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, (phase, sig, proc.returncode, err[-2000:])
        assert needle in out + err and "Traceback" not in err, (out, err)
        if code == 75:
            assert "exiting with 75; rerun the same command to continue" in out
