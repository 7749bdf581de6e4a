"""AdamW with the usual no-decay set, and the per-step schedule: linear warmup, then cosine to
min_lr."""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> List[dict]:
    """Biases, norm weights (all 1-d tensors) and the position embedding / cls token get no weight
    decay."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(modules: Iterable[nn.Module], learning_rate: float, weight_decay: float,
                    device: torch.device, lr_as_tensor: bool = False) -> torch.optim.AdamW:
    """AdamW; fused on CUDA (the whole update in a few launches: it matters for the small ViT-S
    step).

    lr_as_tensor (CUDA graphs): the lr lives in a device tensor that set_lr updates in place, so an
    optimizer step captured once in a graph reads each step's value; the step is then also
    capturable.
    """
    cuda = device.type == "cuda"
    lr = (
        torch.tensor(learning_rate, dtype=torch.float32, device=device)
        if lr_as_tensor
        else learning_rate
    )
    return torch.optim.AdamW(
        param_groups(modules, weight_decay), lr=lr, fused=cuda, capturable=lr_as_tensor and cuda
    )


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup to base_lr over warmup_steps (first step already > 0), then cosine to min_lr at
    total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_schedule(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> List[float]:
    """The whole run's per-step learning rates, precomputed (DINO style) so resume and tests can
    index them.

    A warmup longer than the run (short smoke runs) is cut to the run: the lr then rises until the
    last step.
    """
    warmup_steps = min(warmup_steps, total_steps)
    schedule = [lr_at(s, total_steps, warmup_steps, base_lr, min_lr) for s in range(total_steps)]
    assert len(schedule) == total_steps
    return schedule


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's lr; a tensor lr is filled in place (a device op, no host sync,
    graph-safe)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


# How the optimizer runs, not what it has learned: taken from the optimizer at hand, never from a
# checkpoint, so a checkpoint written by a CPU run resumes in a captured CUDA run and back.
RUN_MODE_KEYS = ("fused", "capturable", "foreach", "differentiable")


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """state_dict() with plain-float learning rates (one host read per checkpoint): the format
    checkpoints had."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """load_state_dict, keeping this optimizer's run mode (RUN_MODE_KEYS) and its lr objects (a
    tensor lr is filled with the saved value, so a graph captured later reads the same tensor set_lr
    fills)."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    groups = [{**saved, **{k: own[k] for k in RUN_MODE_KEYS if k in own}}
              for saved, own in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for group, lr in zip(optimizer.param_groups, lrs):
        if isinstance(lr, torch.Tensor):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
