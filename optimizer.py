"""AdamW with the usual no-decay set, and the per-step schedule: linear warmup, then cosine to min_lr."""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> List[dict]:
    """Biases, norm weights (all 1-d tensors) and the position embedding / cls token get no weight decay."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(modules: Iterable[nn.Module], learning_rate: float, weight_decay: float,
                    device: torch.device) -> torch.optim.AdamW:
    # The fused kernel does the whole update in a few launches: it matters for the small ViT-S step on CUDA.
    return torch.optim.AdamW(param_groups(modules, weight_decay), lr=learning_rate,
                             fused=device.type == "cuda")


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup to base_lr over warmup_steps (first step already > 0), then cosine to min_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_schedule(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> List[float]:
    """The whole run's per-step learning rates, precomputed (DINO style) so resume and tests can index them.

    A warmup longer than the run (short smoke runs) is cut to the run: the lr then rises until the last step.
    """
    warmup_steps = min(warmup_steps, total_steps)
    schedule = [lr_at(s, total_steps, warmup_steps, base_lr, min_lr) for s in range(total_steps)]
    assert len(schedule) == total_steps
    return schedule


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
