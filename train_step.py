"""One optimizer step, and how it is made fast: eager, torch.compile, or replayed from a CUDA graph.

    step = make_train_step(run)          # from train.compile, train.cuda_graphs; step.mode: which
    losses = step(batch_indices, view_params, global_step, cached_targets_or_None)  # [loss, *terms]
    report = check_equivalence(run, captured_step, eager_step, batches)   # report["captured_ok"]

A step gathers its images (uint8, resident on the device) by index, renders the student and
teacher views (transforms.model_inputs), runs the frozen teacher (or reads cached targets), the
student and the loss, backward, and AdamW. At batch 64 the ViT-S/16 student step (37 tokens per
image) is kernel-launch bound: hundreds of small launches per step. Captured once in a CUDA graph,
all of it is one launch per step; what reads the host (loss read-backs, diagnostics, checkpoints,
stop checks) stays outside the graph, in the trainer's loop.

Modes (StepMode.name): captured, captured + compiled, compiled, eager. torch.compile runs inside
the capture in its `default` and `max-autotune-no-cudagraphs` modes; `reduce-overhead` and
`max-autotune` record CUDA graphs of their own, which cannot be captured again:
train.cuda_graphs=true refuses them, auto runs them uncaptured.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import distributed
from config import Config, UserError
from distill_loss import Criterion, DistillLoss
from loggers import Loggers
from models import autocast, student_tokens
from optimizer import set_lr
from teacher_cache import TeacherCache
from transforms import model_inputs


# ----------------------------------------------------------------- what a step runs on
@dataclass(frozen=True)
class Data:
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32] on the training device
    train_labels: torch.Tensor
    diag_images: torch.Tensor  # fixed held-out test batch for the per-epoch collapse diagnostics
    num_classes: int
    digest: str = ""  # data_loader.data_digest of the training images and labels


class Trainable(nn.Module):
    """Everything that receives gradients, in one module so DDP wraps (and syncs) all of it.

    forward returns (loss, *terms), the terms named by loss.term_names (distill_loss.Criterion).
    """

    def __init__(self, student: nn.Module, loss: Criterion):
        super().__init__()
        self.student, self.loss = student, loss

    @property
    def criterion(self) -> Optional[DistillLoss]:
        """The distillation part: adapters and target statistics (checkpoint key "projection")."""
        return self.loss.distill

    @property
    def head(self) -> Optional[nn.Linear]:
        """The label head of the supervised objective or of train.ce_weight > 0 (checkpoint key
        "head")."""
        return self.loss.labels.head if self.loss.labels is not None else None

    def forward(self, x, t_cls=None, t_patch=None, labels=None):
        s_cls, s_patch = student_tokens(self.student, x)
        return self.loss(s_cls, s_patch, t_cls, t_patch, labels)


@dataclass(frozen=True)
class Run:
    """What a run is made of, built once by build_run and passed around; nothing edits it
    afterwards."""
    cfg: Config
    info: distributed.DistInfo
    device: torch.device
    amp: Optional[torch.dtype]  # autocast dtype, None = fp32
    data: Data
    teacher: Optional[nn.Module]  # frozen; None for the supervised objective
    # the bare module: checkpoints and diagnostics (the step wraps it for DDP/compile)
    trainable: Trainable
    optimizer: torch.optim.Optimizer  # its lr is a device tensor when cuda_graphs
    schedule: List[float]  # lr of every global step
    steps_per_epoch: int
    teacher_cache: Optional[TeacherCache] = None  # train.cache_teacher_features: targets from disk
    cuda_graphs: bool = False  # the step is captured in a CUDA graph (train_step.py)
    # checkpoint.run_inputs: data and teacher digests, checked on resume
    inputs: Optional[Dict[str, Any]] = None
    ema: Optional[nn.Module] = None  # train.ema_decay: the student's EMA, updated after each step
    loggers: Loggers = dataclasses.field(default_factory=Loggers)  # rank 0's train.loggers

    @property
    def latest_path(self) -> str:
        return os.path.join(self.cfg.train.checkpoint_dir, "checkpoint_latest.pth")

    @property
    def plan(self) -> Dict[str, int]:
        """What the lr schedule and an in-epoch position mean; a resume must find the same plan."""
        return {"steps_per_epoch": self.steps_per_epoch, "total_steps": len(self.schedule),
                "global_batch": self.cfg.train.batch_size * self.info.world_size,
                "num_train_images": len(self.data.train_images)}


Step = Callable[..., torch.Tensor]
WARMUP_STEPS = 3  # eager steps before capture: lazy inits (cuBLAS, AdamW state, compile) run there
CAPTURABLE_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
OWN_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # torch.compile records graphs itself
# The equivalence check: captured may differ from eager by at most FACTOR x what eager differs from
# itself. Eager is often bit-reproducible (floor 0), so the floor is at least MIN_FLOOR (relative):
# reordering noise at bf16 level, far below what a broken capture gives (0.05-1: test_train_step).
EQUIVALENCE_STEPS = 5
EQUIVALENCE_FACTOR = 10.0
EQUIVALENCE_MIN_FLOOR = 1e-3


def compile_mode(cfg: Config) -> Optional[str]:
    """train.compile as a torch.compile mode: None = off, true = "default"."""
    value = cfg.train.compile
    if value is False:
        return None
    return "default" if value is True else value


def step_plan(cfg: Config, info: distributed.DistInfo, device: torch.device) -> Tuple[bool, str]:
    """(capture the step in a CUDA graph?, why); train.cuda_graphs=true where it cannot capture is a
    one-line error."""
    graphs, mode = cfg.train.cuda_graphs, compile_mode(cfg)
    where = None
    if device.type != "cuda":
        where = "a CPU run"
    elif info.enabled:
        where = f"a {info.world_size}-process run (DDP)"
    if graphs is True and where is not None:
        raise UserError(f"train.cuda_graphs=true needs a single-process CUDA run, this is {where}; "
                        f"use train.cuda_graphs=auto (on where possible) or false")
    if graphs is True and mode in OWN_GRAPH_COMPILE_MODES:
        raise UserError(f"train.compile={mode} records CUDA graphs of its own, which cannot be "
                        f"captured inside the step's graph; use "
                        f"train.compile={CAPTURABLE_COMPILE_MODES[1]} (or default) with "
                        f"train.cuda_graphs=true, or train.cuda_graphs=false")
    ema = cfg.train.ema_decay
    if graphs is True and ema is not None:
        raise UserError(f"train.cuda_graphs=true cannot run train.ema_decay={ema:g} (the EMA "
                        f"update is not captured); use train.cuda_graphs=auto or false")
    if graphs is False:
        return False, "train.cuda_graphs=false"
    if where is not None:
        return False, f"train.cuda_graphs={graphs}: {where} does not capture"
    if mode in OWN_GRAPH_COMPILE_MODES:
        return False, f"train.cuda_graphs=auto: train.compile={mode} records CUDA graphs of its own"
    if ema is not None:
        return False, f"train.cuda_graphs=auto: train.ema_decay={ema:g} runs outside a graph"
    return True, captured_reason(cfg)


def captured_reason(cfg: Config) -> str:
    return f"train.cuda_graphs={cfg.train.cuda_graphs} on a single-process CUDA run"


def cuda_graphs_enabled(cfg: Config, info: distributed.DistInfo, device: torch.device) -> bool:
    """train.cuda_graphs: auto = on for single-process CUDA runs; true where impossible: 1 line."""
    return step_plan(cfg, info, device)[0]


@dataclass(frozen=True)
class StepMode:
    """Which step runs and why: the trainer's first log record and bench.json carry it."""
    name: str  # captured | captured + compiled | compiled | eager
    reason: str
    capture_error: Optional[str] = None  # the capture's own error, when auto mode fell back

    def record(self) -> Dict[str, Optional[str]]:
        return {"step_mode": self.name, "step_mode_reason": self.reason,
                "capture_error": self.capture_error}


def make_train_step(run: Run, capture_fn: Optional[Callable] = None) -> "TrainStep":
    """The step for this run: DDP across ranks, torch.compile when train.compile, a CUDA graph when
    run.cuda_graphs.

    In auto mode a capture that fails falls back to the uncaptured step with one warning naming the
    capture's own error; cuda_graphs=true raises it as one line. `capture_fn` replaces `capture`
    (tests: a stand-in graph).
    """
    model, teacher, mode = run.trainable, run.teacher, compile_mode(run.cfg)
    if run.info.enabled:
        ids = [run.device.index] if run.device.type == "cuda" else None
        # Buffers (pooling matrices, target statistics) are identical on every rank: no broadcast.
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if mode is not None:
        model = torch.compile(model, mode=mode)
        teacher = torch.compile(teacher, mode=mode) if teacher is not None else None
    uncaptured = "eager" if mode is None else "compiled"
    if run.cuda_graphs:  # step_plan would refuse a forced capture where none is possible: not here
        reason = captured_reason(run.cfg)
    else:
        reason = step_plan(run.cfg, run.info, run.device)[1]
    reason += f"; torch.compile mode {mode}" if mode is not None else ""
    if not run.cuda_graphs:
        return EagerStep(run, model, teacher, StepMode(uncaptured, reason))
    captured = StepMode("captured" if mode is None else "captured + compiled", reason)
    try:
        return CapturedStep(run, model, teacher, captured, capture_fn or capture)
    except CaptureFailed as e:  # weights, optimizer state, stream and RNG are restored before this
        if run.cfg.train.cuda_graphs is True:
            raise UserError(f"train.cuda_graphs=true: capturing the training step failed "
                            f"({e.message}); use train.cuda_graphs=false (or auto: falls back "
                            f"to the uncaptured step)") from None
        warnings.warn(f"CUDA graph capture failed ({e.message}); training with the {uncaptured} "
                      f"step (set train.cuda_graphs=false to skip the attempt)", stacklevel=2)
        fallback = StepMode(uncaptured, f"capture failed, fell back: {reason}", e.message)
        return EagerStep(run, model, teacher, fallback)


def forward_losses(run: Run, model: nn.Module, teacher: Optional[nn.Module], indices: torch.Tensor,
                   params: torch.Tensor, targets: Optional[torch.Tensor],
                   cache_enabled: bool = True) -> Tuple[torch.Tensor, ...]:
    """Gathers the batch, renders the views, runs teacher (or reads `targets`) and student:
    (loss, *terms).

    `targets` [B, 1 + Ns, D]: cached teacher CLS + pooled patch tokens for these views.
    """
    cfg = run.cfg
    images, labels = run.data.train_images[indices], run.data.train_labels[indices]
    live = teacher is not None and targets is None
    x, teacher_x = model_inputs(images, params, cfg.model.student_img_size,
                                cfg.model.teacher_img_size if live else None,
                                blur=cfg.train.blur_prob > 0)
    with autocast(run.device, run.amp, cache_enabled=cache_enabled):
        t_cls, t_patch = teacher(teacher_x) if live else (None, None)
        if targets is not None:
            t_cls, t_patch = targets[:, 0], targets[:, 1:]
        return model(x, t_cls, t_patch, labels)


def update(run: Run, losses: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """backward, AdamW and the EMA; the detached (loss, *terms) as one float32 tensor (no host
    sync); the terms are named by run.trainable.loss.term_names."""
    run.optimizer.zero_grad(set_to_none=True)
    losses[0].backward()
    run.optimizer.step()
    if run.ema is not None:
        update_ema(run.ema, run.trainable.student, run.cfg.train.ema_decay)
    return torch.stack([loss.detach() for loss in losses]).float()


@torch.no_grad()
def update_ema(ema: nn.Module, student: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * student, parameters in one fused call; buffers copied."""
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(list(ema.parameters()), student_params, 1.0 - decay)
    for mine, theirs in zip(ema.buffers(), student.buffers()):
        mine.copy_(theirs)


class TrainStep:
    """step(indices, params, global_step, targets): one step at the schedule's lr; at_lr: at any lr.

    `model` and `teacher` are what the step runs (compiled/DDP wrappers of run.trainable and
    run.teacher): EagerStep(run, step.model, step.teacher, ...) computes what this step does.
    """

    def __init__(self, run: Run, model: nn.Module, teacher: Optional[nn.Module], mode: StepMode):
        self.run, self.model, self.teacher, self.mode = run, model, teacher, mode

    def __call__(self, indices: torch.Tensor, params: torch.Tensor, global_step: int,
                 targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.at_lr(indices, params, self.run.schedule[global_step], targets)

    def at_lr(self, indices: torch.Tensor, params: torch.Tensor, lr: float,
              targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError


class EagerStep(TrainStep):
    def at_lr(self, indices, params, lr, targets=None):
        set_lr(self.run.optimizer, lr)
        losses = forward_losses(self.run, self.model, self.teacher, indices, params, targets)
        return update(self.run, losses)


class CapturedStep(TrainStep):
    """The whole step — gather, views, teacher, student, loss, backward, AdamW — recorded once,
    replayed each step.

    A graph replays fixed memory addresses, so each step copies its batch (indices, view params,
    cached targets) into static input buffers, and the optimizer reads its lr from a device tensor
    that set_lr fills in place (run.optimizer is built with lr_as_tensor). The eager warm-up steps
    before capture would move the weights and draw random numbers: parameters, optimizer state and
    RNG states are snapshotted before and restored after, so capturing changes nothing. Autocast's
    weight-cast cache is off inside the graph (a cached cast would be a stale address on replay).
    """

    def __init__(self, run: Run, model: nn.Module, teacher: Optional[nn.Module], mode: StepMode,
                 capture_fn: Optional[Callable] = None):
        super().__init__(run, model, teacher, mode)
        b, device = run.cfg.train.batch_size, run.device
        self.indices = torch.arange(b, device=device) % len(run.data.train_images)  # a valid batch
        self.params = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0], device=device).repeat(b, 1)
        self.targets = None
        if run.teacher_cache is not None:
            cache = run.teacher_cache
            self.targets = torch.zeros(b, cache.num_tokens, cache.dim, dtype=torch.bfloat16,
                                       device=device)
        indices, params, targets = self.indices, self.params, self.targets  # what the graph reads

        def compute() -> torch.Tensor:
            losses = forward_losses(run, model, teacher, indices, params, targets,
                                    cache_enabled=False)
            return update(run, losses)
        saved = snapshot(run)
        try:
            # The captured backward must write the grads, not add to them: None when capture starts.
            self.graph, self.losses = (capture_fn or capture)(
                compute, device, before_capture=lambda: run.optimizer.zero_grad(set_to_none=True))
        finally:
            restore(run, saved)

    def load_inputs(self, indices: torch.Tensor, params: torch.Tensor,
                    targets: Optional[torch.Tensor]) -> None:
        self.indices.copy_(indices, non_blocking=True)
        self.params.copy_(params, non_blocking=True)
        if targets is not None:
            self.targets.copy_(targets, non_blocking=True)

    def at_lr(self, indices, params, lr, targets=None):
        set_lr(self.run.optimizer, lr)
        self.load_inputs(indices, params, targets)
        self.graph.replay()
        return self.losses.clone()  # the next replay overwrites self.losses


# ----------------------------------------------------------------- capture
class CaptureFailed(Exception):
    """A capture that failed; `cause` is the step's own error. torch.cuda.graph's exit calls
    capture_end(), whose error ("operation failed due to a previous error during capture") would
    otherwise replace it."""

    def __init__(self, cause: BaseException):
        text = str(cause).strip()
        self.cause = cause
        self.message = f"{type(cause).__name__}: {text.splitlines()[0][:200]}" if text \
            else type(cause).__name__
        super().__init__(self.message)


def capture(fn: Callable[[], Any], device: torch.device, warmup: int = WARMUP_STEPS,
            before_capture: Optional[Callable[[], None]] = None
            ) -> Tuple[torch.cuda.CUDAGraph, Any]:
    """Runs fn `warmup` times on a side stream (lazy inits, compilation), then records one call:
    (graph, outputs).

    Warm-up and capture share the stream: libraries create per-stream handles and workspaces
    lazily, and that set-up must not happen mid-capture. graph.replay() reruns the recorded kernels
    on the same memory; `outputs` then hold the new results. A failure raises CaptureFailed (see
    record).
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()

    def context() -> torch.cuda.graph:
        # thread_local: the teacher cache's prefetch thread may pin host memory meanwhile, which is
        # not this capture's.
        return torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local")
    return graph, record(context, fn, device)


def record(context: Callable[[], Any], fn: Callable[[], Any], device: torch.device) -> Any:
    """fn() inside `context()` (a capture). On failure raises CaptureFailed with fn's own error,
    after putting back the current stream (torch.cuda.graph leaves its side stream current when
    capture_end raises) and the RNG states.

    If the CUDA generator is still unusable then (builds that keep its "capturing" flag raise
    "Offset increment outside graph capture" at the next random op), the run cannot go on safely:
    one line.
    """
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    rng = rng_states(device)
    cause: Optional[BaseException] = None
    try:
        with context():
            try:
                return fn()
            except BaseException as e:
                cause = e
                raise
    except Exception as e:
        cause = cause if cause is not None else e
        if not isinstance(cause, Exception):  # Ctrl-C during capture is not a capture failure
            raise cause from None
        if stream is not None:
            torch.cuda.set_stream(stream)
        failed = CaptureFailed(cause)
        try:
            set_rng_states(rng, device)
            rng_probe(device)
            set_rng_states(rng, device)  # the probe drew from it
        except Exception as broken:
            raise UserError(f"CUDA graph capture failed ({failed.message}) and left the random "
                            f"number generator unusable ({CaptureFailed(broken).message}); set "
                            f"train.cuda_graphs=false") from None
        raise failed from cause


def rng_probe(device: torch.device) -> None:
    """One random op on `device` of the kind drop path draws (bernoulli_): raises if broken."""
    torch.empty(1, device=device).bernoulli_(0.5)


# ----------------------------------------------------------------- state
def rng_states(device: torch.device) -> Dict[str, torch.Tensor]:
    """The CPU RNG and, on CUDA, the device's: drop path draws from the generator of its device."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: Dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def snapshot(run: Run) -> Dict[str, Any]:
    """Copies of the trainable parameters, the optimizer state (None: no state yet) and the RNG
    states (so a run draws the same drop-path masks whether or not warm-up steps ran between)."""
    params = [p.detach().clone() for p in run.trainable.parameters()]
    state = [{k: v.clone() for k, v in run.optimizer.state[p].items() if torch.is_tensor(v)}
             if p in run.optimizer.state else None for p in run.trainable.parameters()]
    return {"params": params, "state": state, "rng": rng_states(run.device)}


@torch.no_grad()
def restore(run: Run, saved: Dict[str, Any]) -> None:
    """Writes the snapshot back in place (the graph keeps the addresses); state created since is
    zeroed, which is AdamW's initial state (step 0, zero moments)."""
    for p, value, state in zip(run.trainable.parameters(), saved["params"], saved["state"]):
        p.copy_(value)
        for key, tensor in run.optimizer.state.get(p, {}).items():
            if torch.is_tensor(tensor):
                tensor.copy_(state[key]) if state is not None else tensor.zero_()
    if "rng" in saved:
        set_rng_states(saved["rng"], run.device)


# ----------------------------------------------------------------- equivalence check
def check_equivalence(run: Run, captured: TrainStep, eager: TrainStep,
                      batches: Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
                      steps: int = EQUIVALENCE_STEPS) -> Dict[str, Any]:
    """Does the captured step compute what the eager one does? `captured_ok` and its figures.

    From one state, `steps` steps on the same batches (batches = epoch_batches(run, e)) at a
    RISING lr (linear up to train.learning_rate: a graph with the lr baked in at capture would
    differ): eager, eager again (the noise floor), captured. Relative differences: losses
    max|a - b| / max|a|, weights |wa - wb| / |wa - w0| (L2 over all parameters: next to the update
    made). Pass: both captured-vs-eager figures within EQUIVALENCE_FACTOR x max(floor,
    EQUIVALENCE_MIN_FLOOR), and one captured step at lr = 0 leaves every weight bit-identical. The
    run's weights, optimizer state and RNG are as before afterwards.
    """
    indices, params, targets = batches
    if len(indices) < steps:
        raise ValueError(f"check_equivalence needs {steps} batches, got {len(indices)}")
    lrs = [run.cfg.train.learning_rate * (i + 1) / steps for i in range(steps)]
    start = snapshot(run)

    def trajectory(step: TrainStep) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        restore(run, start)
        losses = torch.stack([step.at_lr(indices[i], params[i], lrs[i],
                                         None if targets is None else targets[i])
                              for i in range(steps)])
        return losses.float().cpu(), [p.detach().clone() for p in run.trainable.parameters()]
    loss_a, w_a = trajectory(eager)
    loss_b, w_b = trajectory(eager)
    loss_c, w_c = trajectory(captured)
    restore(run, start)
    captured.at_lr(indices[0], params[0], 0.0, None if targets is None else targets[0])
    lr0_identical = all(torch.equal(p, q) for p, q in zip(run.trainable.parameters(),
                                                          start["params"]))
    restore(run, start)

    update_norm = _norm([a - w0 for a, w0 in zip(w_a, start["params"])])
    scale = float(loss_a.abs().max())
    figures = {
        "steps": steps, "lr_first": lrs[0], "lr_last": lrs[-1],
        "loss_rel_diff": float((loss_c - loss_a).abs().max()) / max(scale, 1e-30),
        "loss_rel_floor": float((loss_b - loss_a).abs().max()) / max(scale, 1e-30),
        "update_rel_diff": _norm([c - a for c, a in zip(w_c, w_a)]) / max(update_norm, 1e-30),
        "update_rel_floor": _norm([b - a for b, a in zip(w_b, w_a)]) / max(update_norm, 1e-30),
        "update_norm": update_norm, "loss_scale": scale, "factor": EQUIVALENCE_FACTOR,
        "min_floor": EQUIVALENCE_MIN_FLOOR, "lr0_weights_identical": lr0_identical,
    }
    within = all(figures[f"{k}_rel_diff"]
                 <= EQUIVALENCE_FACTOR * max(figures[f"{k}_rel_floor"], EQUIVALENCE_MIN_FLOOR)
                 for k in ("loss", "update"))
    finite = all(math.isfinite(v) for v in figures.values() if isinstance(v, float))
    figures["captured_ok"] = bool(within and finite and lr0_identical and update_norm > 0)
    return figures


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    """L2 norm over a list of tensors, in float64 (differences can be tiny next to the weights)."""
    return float(torch.stack([t.double().pow(2).sum() for t in tensors]).sum().sqrt())
