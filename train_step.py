"""One optimizer step, and how it is made fast: eager, torch.compile, or replayed from one CUDA graph.

    step = make_train_step(run)                              # mode from train.compile and train.cuda_graphs
    losses = step(batch_indices, view_params, global_step, cached_targets_or_None)  # [loss, cls, patch], no sync

A step gathers its images (uint8, resident on the device) by index, renders the student and teacher views
(transforms.model_inputs), runs the frozen teacher (or reads cached targets), the student and the loss, backward,
and AdamW. At batch 64 the ViT-S/16 student step (37 tokens per image) is kernel-launch bound: hundreds of small
launches per step. Captured once in a CUDA graph, all of it is one launch per step; what reads the host (loss
read-backs, diagnostics, checkpoints, stop checks) stays outside the graph, in the trainer's loop.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import distributed
from config import Config, UserError
from models import autocast
from optimizer import set_lr
from transforms import model_inputs

if TYPE_CHECKING:  # the trainer imports this module: only type checkers look back
    from distill_trainer import Run

Step = Callable[..., torch.Tensor]
WARMUP_STEPS = 3  # eager steps before capture: lazy inits (cuBLAS, AdamW state, compile) must not be captured


def cuda_graphs_enabled(cfg: Config, info: distributed.DistInfo, device: torch.device) -> bool:
    """train.cuda_graphs: auto = on for single-process CUDA runs; true where impossible is a one-line error."""
    possible = device.type == "cuda" and not info.enabled
    if cfg.train.cuda_graphs is True and not possible:
        where = "a CPU run" if device.type != "cuda" else f"a {info.world_size}-process run (DDP)"
        raise UserError(f"train.cuda_graphs=true needs a single-process CUDA run, this is {where}; use "
                        f"train.cuda_graphs=auto (on where possible) or false")
    # The EMA update is not part of the captured step: with an EMA, auto trains eagerly.
    if cfg.train.ema_decay is not None:
        if cfg.train.cuda_graphs is True:
            raise UserError(f"train.cuda_graphs=true cannot run train.ema_decay={cfg.train.ema_decay:g} (the EMA "
                            f"update is not captured); use train.cuda_graphs=auto or false")
        return False
    return possible and cfg.train.cuda_graphs in (True, "auto")


def make_train_step(run: Run) -> Step:
    """The step for this run: DDP across ranks, torch.compile when train.compile, a CUDA graph when run.cuda_graphs.

    In auto mode a capture that fails falls back to the eager step with one warning; cuda_graphs=true raises.
    """
    model, teacher = run.trainable, run.teacher
    if run.info.enabled:
        ids = [run.device.index] if run.device.type == "cuda" else None
        # Buffers (pooling matrices, target statistics) are identical on every rank: no per-step broadcast.
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if run.cfg.train.compile:
        model = torch.compile(model)
        teacher = torch.compile(teacher) if teacher is not None else None
    if not run.cuda_graphs:
        return eager_step(run, model, teacher)
    try:
        return CapturedStep(run, model, teacher)
    except Exception as e:  # capture is all-or-nothing: state is restored before this is raised
        if run.cfg.train.cuda_graphs is True:
            raise UserError(f"train.cuda_graphs=true: capturing the training step failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); use train.cuda_graphs=false") from None
        warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); training with the eager "
                      f"step (set train.cuda_graphs=false to skip the attempt)", stacklevel=2)
        return eager_step(run, model, teacher)


def forward_losses(run: Run, model: nn.Module, teacher: Optional[nn.Module], indices: torch.Tensor,
                   params: torch.Tensor, targets: Optional[torch.Tensor],
                   cache_enabled: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gathers the batch, renders the views, runs teacher (or reads `targets`) and student: (loss, cls, patch).

    `targets` [B, 1 + Ns, D]: cached teacher CLS + pooled patch tokens for these views, instead of the teacher.
    """
    cfg = run.cfg
    images, labels = run.data.train_images[indices], run.data.train_labels[indices]
    live = teacher is not None and targets is None
    x, teacher_x = model_inputs(images, params, cfg.model.student_img_size,
                                cfg.model.teacher_img_size if live else None, blur=cfg.train.blur_prob > 0)
    with autocast(run.device, run.amp, cache_enabled=cache_enabled):
        t_cls, t_patch = teacher(teacher_x) if live else (None, None)
        if targets is not None:
            t_cls, t_patch = targets[:, 0], targets[:, 1:]
        return model(x, t_cls, t_patch, labels)


def update(run: Run, losses: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """backward, AdamW and the EMA; the detached losses as one float32 [3] tensor (no host sync)."""
    run.optimizer.zero_grad(set_to_none=True)
    losses[0].backward()
    run.optimizer.step()
    if run.ema is not None:
        update_ema(run.ema, run.trainable.student, run.cfg.train.ema_decay)
    return torch.stack([loss.detach() for loss in losses]).float()


@torch.no_grad()
def update_ema(ema: nn.Module, student: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * student, parameters in one fused call; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in student.parameters()], 1.0 - decay)
    for mine, theirs in zip(ema.buffers(), student.buffers()):
        mine.copy_(theirs)


def eager_step(run: Run, model: nn.Module, teacher: Optional[nn.Module]) -> Step:
    def step(indices: torch.Tensor, params: torch.Tensor, global_step: int,
             targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        set_lr(run.optimizer, run.schedule[global_step])
        return update(run, forward_losses(run, model, teacher, indices, params, targets))
    return step


class CapturedStep:
    """The whole step — gather, views, teacher, student, loss, backward, AdamW — recorded once, replayed each step.

    A graph replays fixed memory addresses, so each step copies its batch (indices, view params, cached targets)
    into static input buffers, and the optimizer reads its lr from a device tensor that set_lr fills in place
    (run.optimizer is built with lr_as_tensor). The eager warm-up steps before capture would move the weights:
    parameters and optimizer state are snapshotted before and restored after, so capturing changes nothing.
    Autocast's weight-cast cache is off inside the graph (a cached cast would be a stale address on replay).
    """

    def __init__(self, run: Run, model: nn.Module, teacher: Optional[nn.Module]):
        self.run = run
        b, device = run.cfg.train.batch_size, run.device
        self.indices = torch.arange(b, device=device) % len(run.data.train_images)  # any valid batch
        self.params = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0], device=device).repeat(b, 1)
        self.targets = None
        if run.teacher_cache is not None:
            cache = run.teacher_cache
            self.targets = torch.zeros(b, cache.num_tokens, cache.dim, dtype=torch.bfloat16, device=device)
        saved = snapshot(run)
        try:
            self.graph, self.losses = self._capture(model, teacher)
        finally:
            restore(run, saved)

    def _capture(self, model: nn.Module, teacher: Optional[nn.Module]):
        run = self.run

        def compute() -> torch.Tensor:
            losses = forward_losses(run, model, teacher, self.indices, self.params, self.targets,
                                    cache_enabled=False)
            return update(run, losses)
        # The captured backward must write the grads, not add to them: they are None when capture starts.
        return capture(compute, run.device, before_capture=lambda: run.optimizer.zero_grad(set_to_none=True))

    def __call__(self, indices: torch.Tensor, params: torch.Tensor, global_step: int,
                 targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        set_lr(self.run.optimizer, self.run.schedule[global_step])
        self.indices.copy_(indices, non_blocking=True)
        self.params.copy_(params, non_blocking=True)
        if targets is not None:
            self.targets.copy_(targets, non_blocking=True)
        self.graph.replay()
        return self.losses.clone()  # the next replay overwrites self.losses


def capture(fn: Callable[[], Any], device: torch.device, warmup: int = WARMUP_STEPS,
            before_capture: Optional[Callable[[], None]] = None) -> Tuple[torch.cuda.CUDAGraph, Any]:
    """Runs fn `warmup` times on a side stream (lazy inits, compilation), then records one call: (graph, outputs).

    Warm-up and capture share the stream: libraries create per-stream handles and workspaces lazily, and that
    set-up must not happen mid-capture. graph.replay() reruns the recorded kernels on the same memory; `outputs`
    then hold the new results.
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
    # thread_local: the teacher cache's prefetch thread may pin host memory meanwhile, which is not this capture's.
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        outputs = fn()
    return graph, outputs


def snapshot(run: Run) -> Dict[str, List[Optional[torch.Tensor]]]:
    """Copies of the trainable parameters and the optimizer state (None: the optimizer has no state yet)."""
    params = [p.detach().clone() for p in run.trainable.parameters()]
    state = [{k: v.clone() for k, v in run.optimizer.state[p].items() if torch.is_tensor(v)}
             if p in run.optimizer.state else None for p in run.trainable.parameters()]
    return {"params": params, "state": state}


@torch.no_grad()
def restore(run: Run, saved: Dict[str, List]) -> None:
    """Writes the snapshot back in place (the graph keeps the addresses); state created since is zeroed, which is
    AdamW's initial state (step 0, zero moments)."""
    for p, value, state in zip(run.trainable.parameters(), saved["params"], saved["state"]):
        p.copy_(value)
        for key, tensor in run.optimizer.state.get(p, {}).items():
            if torch.is_tensor(tensor):
                tensor.copy_(state[key]) if state is not None else tensor.zero_()
