"""Fixtures shared by the test files; plain helpers live in helpers.py."""
from __future__ import annotations

import pytest
import torch

from helpers import make_imagefolder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: on a busy 2-core machine thread hand-offs cost more than the work itself (10x
    seen)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("synthetic"))
