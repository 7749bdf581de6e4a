"""The step modes (train_step.py): which runs capture a CUDA graph, and that capturing changes
nothing (CPU).

The graph itself needs a GPU (scripts/gpu_checks.sh, tests/test_gpu.py). What runs here is the rest
of the capture path: the mode switch, the snapshot/restore that undoes the eager warm-up steps, the
equivalence check driven by stand-in graphs that rerun the step (correct, or broken in the three
ways a capture can be), and a failed capture's fallback.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import distill_trainer
import train_step
from config import UserError, dotted, replace_values
from distributed import DistInfo
from helpers import tiny_config
from train_step import (WARMUP_STEPS, CapturedStep, CaptureFailed, EagerStep, StepMode,
                        check_equivalence, cuda_graphs_enabled, make_train_step, record, restore,
                        snapshot, step_plan)

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
    with pytest.raises(
        UserError, match="train.cuda_graphs=true needs a single-process CUDA run"
    ) as e:
        cuda_graphs_enabled(cfg, DistInfo(world_size=world_size), device)
    assert needle in str(e.value) and "\n" not in str(e.value)


def run_steps(run, step, steps):
    indices, params, _ = distill_trainer.epoch_batches(run, 0)
    return torch.stack([step(indices[i], params[i], i) for i in range(steps)])


def weights(run):
    return [p.detach().clone() for p in run.trainable.parameters()]


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh_optimizer", "optimizer_with_state"])
def test_warm_up_before_capture_leaves_no_trace(tmp_path, synthetic_root, resumed):
    """Snapshot, the warm-up's eager steps, restore: the run then trains exactly as if they never
    happened."""
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
    cfg = replace_values(
        tiny_config(synthetic_root, str(tmp_path / "run")),
        dotted({"train.cuda_graphs": "auto"}),
        "test",
    )
    run = distill_trainer.build_run(cfg, DistInfo(), CPU)
    assert run.cuda_graphs is False and isinstance(run.optimizer.param_groups[0]["lr"], float)
    before = weights(run)
    losses = run_steps(run, make_train_step(run), 2)
    assert losses.shape == (2, 3) and torch.isfinite(losses).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(run)))


# ----------------------------------------------------------------- equivalence, stand-in graphs
class RerunGraph:
    """A stand-in CUDA graph for CPU: replay() reruns the captured function on the tensors it was
    captured with, into the capture's output tensor, as a real replay reruns its kernels on the same
    memory."""

    def __init__(self, fn, outputs):
        self.fn, self.outputs = fn, outputs

    def replay(self):
        self.outputs.copy_(self.fn())


def rerun_capture(fn, device, before_capture=None):
    if before_capture is not None:
        before_capture()
    outputs = fn()  # CapturedStep restores the weights this moved
    return RerunGraph(fn, outputs), outputs


class FrozenLrGraph(RerunGraph):
    """A broken capture: the lr read at capture is baked in (e.g. a Python float lr)."""

    def __init__(self, fn, outputs, optimizer):
        super().__init__(fn, outputs)
        self.optimizer, self.lrs = optimizer, [g["lr"] for g in optimizer.param_groups]

    def replay(self):
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr
        super().replay()


class NoUpdateGraph(RerunGraph):
    """A broken capture: the losses come back, the optimizer's writes to the weights do not."""

    def __init__(self, fn, outputs, params):
        super().__init__(fn, outputs)
        self.params = params

    def replay(self):
        before = [p.detach().clone() for p in self.params]
        super().replay()
        with torch.no_grad():
            for p, b in zip(self.params, before):
                p.copy_(b)


class RebindsInputs(CapturedStep):
    """A broken capture: each batch is bound to new tensors instead of copied into the graph's
    buffers, so the graph keeps reading the batch it was captured with."""

    def load_inputs(self, indices, params, targets):
        self.indices, self.params, self.targets = indices.clone(), params.clone(), targets


def stand_in_step(run, broken):
    mode = StepMode("captured", "test: stand-in graph")
    if broken == "frozen_inputs":
        return RebindsInputs(run, run.trainable, run.teacher, mode, rerun_capture)

    def capture_fn(fn, device, before_capture=None):
        graph, outputs = rerun_capture(fn, device, before_capture)
        if broken == "frozen_lr":
            return FrozenLrGraph(fn, outputs, run.optimizer), outputs
        if broken == "missing_update":
            return NoUpdateGraph(fn, outputs, list(run.trainable.parameters())), outputs
        return graph, outputs
    return CapturedStep(run, run.trainable, run.teacher, mode, capture_fn)


@pytest.mark.parametrize("cached", [False, True], ids=["live_teacher", "cached_targets"])
@pytest.mark.parametrize("broken", ["correct", "frozen_inputs", "frozen_lr", "missing_update"])
def test_equivalence_check_fails_for_each_broken_capture(tmp_path, synthetic_root, broken, cached):
    extra = {"train.cache_teacher_features": True, "train.teacher_cache_views": 2} if cached else {}
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"), **extra)
    run = distill_trainer.build_run(cfg, DistInfo(), CPU)
    eager = make_train_step(run)
    captured = stand_in_step(run, broken)
    before = weights(run)
    report = check_equivalence(run, captured, eager, distill_trainer.epoch_batches(run, 0))
    assert all(torch.equal(a, b) for a, b in zip(before, weights(run)))  # the run is as it was
    assert report["steps"] >= 5 and report["lr_first"] < report["lr_last"]  # a rising lr
    # CPU eager is bit-reproducible: the floor is 0 and the tolerance factor x min_floor
    assert report["loss_rel_floor"] == 0 and report["update_rel_floor"] == 0
    tolerance = report["factor"] * report["min_floor"]
    if broken == "correct":
        assert report["captured_ok"] is True and report["lr0_weights_identical"] is True
        assert report["loss_rel_diff"] <= tolerance and report["update_rel_diff"] <= tolerance
        return
    assert report["captured_ok"] is False
    if broken == "frozen_lr":  # 5 steps at the capture's lr, not the rising one; lr 0 moves too
        assert report["update_rel_diff"] > 20 * tolerance
        assert report["lr0_weights_identical"] is False
    elif broken == "missing_update":
        assert report["update_rel_diff"] == pytest.approx(1.0)
        assert report["loss_rel_diff"] > tolerance
    else:  # the same batch every step: other gradients, other losses
        assert report["update_rel_diff"] > 20 * tolerance and report["loss_rel_diff"] > tolerance


# ----------------------------------------------------------------- a failed capture
class FailingCapture:
    """What torch.cuda.graph does when the captured code fails: its __exit__ calls capture_end(),
    which raises an error of its own."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")


def host_read_in_capture(fn, device, before_capture=None):
    """A capture whose step draws random numbers, runs, then does what a graph cannot."""
    def step_with_host_read():
        torch.rand(8)
        fn()
        raise RuntimeError("operation not permitted when stream is capturing (a host read)")
    return None, record(FailingCapture, step_with_host_read, device)


def test_failed_capture_reports_its_own_error_and_restores_the_rng():
    rng = torch.get_rng_state()

    def step():
        torch.rand(100)
        raise ValueError("the real cause")
    with pytest.raises(CaptureFailed) as e:
        record(FailingCapture, step, CPU)
    assert isinstance(e.value.cause, ValueError) and e.value.message == "ValueError: the real cause"
    assert torch.equal(torch.get_rng_state(), rng)


def test_ctrl_c_during_capture_is_not_a_capture_failure():
    def step():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        record(FailingCapture, step, CPU)


def test_unusable_rng_after_a_failed_capture_stops_the_run_in_one_line(monkeypatch):
    def broken_generator(device):
        raise RuntimeError("Offset increment outside graph capture encountered unexpectedly.")
    monkeypatch.setattr(train_step, "rng_probe", broken_generator)
    with pytest.raises(UserError) as e:
        record(FailingCapture, lambda: 1 / 0, CPU)
    text = str(e.value)
    assert "\n" not in text and "ZeroDivisionError" in text and "Offset increment" in text
    assert "train.cuda_graphs=false" in text


def graphs_run(tmp_path, synthetic_root, mode):
    """A CPU run that takes the capture path (cuda_graphs switched on), train.cuda_graphs = mode."""
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"))
    run = distill_trainer.build_run(cfg, DistInfo(), CPU)
    cfg = replace_values(run.cfg, dotted({"train.cuda_graphs": mode}), "test")
    return dataclasses.replace(run, cfg=cfg, cuda_graphs=True)


def test_auto_falls_back_to_eager_naming_the_original_error(tmp_path, synthetic_root):
    run = graphs_run(tmp_path, synthetic_root, "auto")
    before, rng = weights(run), torch.get_rng_state()
    with pytest.warns(UserWarning) as caught:
        step = make_train_step(run, capture_fn=host_read_in_capture)
    assert isinstance(step, EagerStep) and step.mode.name == "eager"
    assert step.mode.capture_error.startswith(
        "RuntimeError: operation not permitted when stream is capturing")
    assert "capture failed" in step.mode.reason
    message = str(caught[0].message)
    assert "operation not permitted" in message and "previous error during capture" not in message
    assert all(torch.equal(a, b) for a, b in zip(before, weights(run)))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.isfinite(run_steps(run, step, 2)).all()  # and training goes on


def test_cuda_graphs_true_refuses_a_failed_capture_in_one_line(tmp_path, synthetic_root):
    run = graphs_run(tmp_path, synthetic_root, True)
    with pytest.raises(UserError) as e:
        make_train_step(run, capture_fn=host_read_in_capture)
    text = str(e.value)
    assert "\n" not in text and "operation not permitted when stream is capturing" in text
    assert "previous error during capture" not in text and "train.cuda_graphs=false" in text


def test_restore_puts_back_the_rng_drop_path_draws_from(tmp_path, synthetic_root):
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"), **{"model.drop_path_rate": 0.5})
    run = distill_trainer.build_run(cfg, DistInfo(), CPU)
    step = make_train_step(run)
    saved = snapshot(run)
    first = run_steps(run, step, 2)
    restore(run, saved)
    again = run_steps(run, step, 2)
    assert torch.equal(first, again)  # without the RNG in the snapshot the drop-path masks differ


# ----------------------------------------------------------------- compile modes
@pytest.mark.parametrize("compile_mode,graphs,expected", [
    ("max-autotune-no-cudagraphs", "auto", True), ("default", True, True), (True, "auto", True),
    ("reduce-overhead", "auto", False), ("max-autotune", "auto", False),
    ("reduce-overhead", False, False),
])
def test_compile_modes_inside_the_capture(tmp_path, compile_mode, graphs, expected):
    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"),
                      **{"train.compile": compile_mode, "train.cuda_graphs": graphs})
    captured, reason = step_plan(cfg, DistInfo(), CUDA)
    assert captured is expected
    if compile_mode in ("reduce-overhead", "max-autotune") and graphs == "auto":
        assert f"train.compile={compile_mode} records CUDA graphs of its own" in reason


@pytest.mark.parametrize("compile_mode", ["reduce-overhead", "max-autotune"])
def test_compile_mode_with_its_own_graphs_refused_inside_the_capture(tmp_path, compile_mode):
    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"),
                      **{"train.compile": compile_mode, "train.cuda_graphs": True})
    with pytest.raises(UserError) as e:
        step_plan(cfg, DistInfo(), CUDA)
    assert "\n" not in str(e.value) and "max-autotune-no-cudagraphs" in str(e.value)


def test_compiled_mode_is_named(tmp_path, synthetic_root):
    """torch.compile is lazy: building the step compiles nothing (no minutes of CPU compiling)."""
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"),
                      **{"train.compile": "max-autotune-no-cudagraphs"})
    step = make_train_step(distill_trainer.build_run(cfg, DistInfo(), CPU))
    assert step.mode.name == "compiled" and "max-autotune-no-cudagraphs" in step.mode.reason
    assert isinstance(step.model, torch._dynamo.eval_frame.OptimizedModule)


# ----------------------------------------------------------------- the first log record
def test_first_log_record_names_the_step_mode(tmp_path, synthetic_root):
    run_dir = tmp_path / "run"
    cfg = tiny_config(synthetic_root, str(run_dir), **{"train.num_epochs": 1,
                                                       "train.save_epochs": [1],
                                                       "train.max_steps_per_epoch": 2})
    assert distill_trainer.train(cfg) == 0
    first = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == 0 and first["step_mode"] == "eager" and first["capture_error"] is None
    assert first["step_mode_reason"] == "train.cuda_graphs=auto: a CPU run does not capture"
