"""The step modes (train_step.py): which runs capture a CUDA graph, and that capturing changes nothing (CPU).

The graph itself needs a GPU: scripts/gpu_checks.sh compares captured and eager losses there. What runs here is
the rest of the capture path: the mode switch, and the snapshot/restore that undoes the eager warm-up steps.
"""
from __future__ import annotations

import pytest
import torch

import distill_trainer
from config import UserError, dotted, replace_values
from distributed import DistInfo
from helpers import tiny_config
from train_step import WARMUP_STEPS, cuda_graphs_enabled, make_train_step, restore, snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # the switch reads only the device type


@pytest.mark.parametrize("mode,device,world_size,expected", [
    ("auto", CUDA, 1, True), ("auto", CUDA, 2, False), ("auto", CPU, 1, False),
    (True, CUDA, 1, True), (False, CUDA, 1, False), (False, CPU, 1, False),
])
def test_cuda_graphs_mode_switch(tmp_path, mode, device, world_size, expected):
    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"), **{"train.cuda_graphs": mode})
    assert cuda_graphs_enabled(cfg, DistInfo(world_size=world_size), device) is expected


@pytest.mark.parametrize("device,world_size,needle", [(CPU, 1, "this is a CPU run"),
                                                      (CUDA, 2, "this is a 2-process run (DDP)")])
def test_cuda_graphs_true_where_impossible_is_one_line(tmp_path, device, world_size, needle):
    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"), **{"train.cuda_graphs": True})
    with pytest.raises(UserError, match="train.cuda_graphs=true needs a single-process CUDA run") as e:
        cuda_graphs_enabled(cfg, DistInfo(world_size=world_size), device)
    assert needle in str(e.value) and "\n" not in str(e.value)


def run_steps(run, step, steps):
    indices, params, _ = distill_trainer.epoch_batches(run, 0)
    return torch.stack([step(indices[i], params[i], i) for i in range(steps)])


def weights(run):
    return [p.detach().clone() for p in run.trainable.parameters()]


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh_optimizer", "optimizer_with_state"])
def test_warm_up_before_capture_leaves_no_trace(tmp_path, synthetic_root, resumed):
    """Snapshot, the warm-up's eager steps, restore: the run then trains exactly as if they never happened."""
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"))
    runs = [distill_trainer.build_run(cfg, DistInfo(), CPU) for _ in range(2)]
    steps = [make_train_step(run) for run in runs]
    if resumed:  # both optimizers hold state (moments, step count) before the snapshot
        for run, step in zip(runs, steps):
            run_steps(run, step, 2)
    saved = snapshot(runs[1])
    run_steps(runs[1], steps[1], WARMUP_STEPS)  # what CapturedStep's warm-up does
    restore(runs[1], saved)
    losses = [run_steps(run, step, 3) for run, step in zip(runs, steps)]
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(weights(runs[0]), weights(runs[1])):
        assert torch.equal(a, b)


def test_eager_step_on_cpu_even_in_auto_mode(tmp_path, synthetic_root):
    cfg = replace_values(tiny_config(synthetic_root, str(tmp_path / "run")), dotted({"train.cuda_graphs": "auto"}),
                         "test")
    run = distill_trainer.build_run(cfg, DistInfo(), CPU)
    assert run.cuda_graphs is False and isinstance(run.optimizer.param_groups[0]["lr"], float)
    before = weights(run)
    losses = run_steps(run, make_train_step(run), 2)
    assert losses.shape == (2, 3) and torch.isfinite(losses).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(run)))
