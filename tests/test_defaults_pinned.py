"""The default method trains exactly what it trained before the levers (issue 21) were added.

A seeded tiny CPU run of the repo's default configs (plus tests/helpers.tiny_overrides) must give
the same first per-step losses as the code had before any lever existed. PINNED was computed on the
2-core CPU dev machine (torch 2.14.1, timm, OMP_NUM_THREADS=1) from commit a0e5b5d, before any lever
code. The tolerance, rel 1e-5, is what float32 reductions in another order (another thread count or
CPU kernel) can move a loss of order 1 by: a few hundred float32 ulps (1.2e-7 each); any change in
what is trained (loss, adapter, targets, init order) moves these by far more.
"""
from __future__ import annotations

import pytest
import torch

import distill_trainer
from distributed import DistInfo
from helpers import tiny_config
from train_step import make_train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 4
# Per step: (total, *terms) as the step returns them: distill (loss, cls, patch), supervised
# (loss, ce); the supervised step returned a third column fixed at 0 before its terms were named,
# dropped here.
PINNED = {
    "default": [
        [1.2393746, 0.70536709, 1.068015],
        [1.13129, 0.6037125, 1.0551549],
        [1.0089636, 0.48603138, 1.0458645],
        [0.83528584, 0.33474392, 1.0010839],
    ],
    "learned_projection": [
        [1.2393746, 0.70536709, 1.068015],
        [1.1293681, 0.60224032, 1.0542556],
        [1.0038426, 0.482149, 1.0433872],
        [0.82678294, 0.32875073, 0.99606448],
    ],
    "supervised": [
        [1.3773608, 1.3773608],
        [1.2995431, 1.2995431],
        [1.2501514, 1.2501514],
        [1.200235, 1.200235],
    ],
}
ARMS = {"default": {}, "learned_projection": {"model.projection": "learned"},
        "supervised": {"train.objective": "supervised"}}


def first_losses(tmp_path, synthetic_root, extra) -> torch.Tensor:
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"), **extra)
    run = distill_trainer.build_run(cfg, DistInfo(), torch.device("cpu"))
    step = make_train_step(run)
    indices, params, _ = distill_trainer.epoch_batches(run, 0)
    return torch.stack([step(indices[i], params[i], i) for i in range(STEPS)])


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_first_losses_of_the_default_method_are_pinned(tmp_path, synthetic_root, arm):
    losses = first_losses(tmp_path, synthetic_root, ARMS[arm])
    assert torch.allclose(losses, torch.tensor(PINNED[arm]), rtol=1e-5, atol=1e-7), losses.tolist()
