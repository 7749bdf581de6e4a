"""House rules that a reader notices: no line of code over 120 characters (STYLE.md)."""
from __future__ import annotations

import glob
import os

from helpers import REPO

MAX_LINE = 120


def test_no_line_over_120_characters():
    files = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "tests", "*.py"))
    long = [f"{os.path.relpath(path, REPO)}:{i}" for path in files
            for i, line in enumerate(open(path, encoding="utf-8"), 1) if len(line.rstrip("\n")) > MAX_LINE]
    assert not long, long
