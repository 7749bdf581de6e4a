"""Feature distillation from a frozen DINOv2 teacher into a ViT student trained from scratch on CIFAR.

Launch (defaults: DINOv2 ViT-B/14 at 224 px -> ViT-S/16 at 96 px, CIFAR-10, 50 epochs):
    python distill_trainer.py
    python distill_trainer.py --data_config data_config.yaml --train_config train_config_kd.yaml \
        --model_config model_config_kd.yaml --override train.num_epochs=3 model.teacher_pretrained=false
    torchrun --standalone --nproc_per_node 4 distill_trainer.py     # one node, 4 GPUs
    sbatch scripts/train.sbatch                                     # SLURM (srun, one task per GPU)

Writes config.yaml, log.jsonl, checkpoint_epoch_{N}.pth and checkpoint_latest.pth to train.checkpoint_dir and
resumes from checkpoint_latest.pth unless --no_resume. Exit codes: 0 done, 2 a user mistake (one line on
stderr), 3 non-finite loss, 75 stopped by SIGUSR1/SIGTERM after saving (the sbatch wrapper requeues).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import distributed
import metrics
import teacher_cache
from checkpoint import capture_rng, load_checkpoint, restore_rng, run_metadata, save_checkpoint
from config import DEFAULT_FILES, ArgumentParser, Config, UserError, load_config
from data_loader import epoch_indices, load_split
from distill_loss import DistillLoss
from models import autocast_dtype, build_student, pooled_feature, student_tokens, unwrap
from optimizer import build_optimizer, lr_schedule, set_lr
from transforms import normalize, render_views, sample_view_params, teacher_view

EXIT_NONFINITE = 3
EXIT_REQUEUE = 75
TARGET_STATS_MAX_IMAGES = 10000
# The names checkpoint.save_checkpoint gives its mkstemp temp files: checkpoint_latest.pth.<random>.tmp
STALE_TEMP_RE = re.compile(r"checkpoint_(latest|epoch_\d+)\.pth\.[^.]+\.tmp$")


class NonFiniteLoss(Exception):
    pass


# ----------------------------------------------------------------- setup
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))  # defaults are the repo's files, from any working directory
    p.add_argument("--data_config", default=os.path.join(here, DEFAULT_FILES["data"]))
    p.add_argument("--train_config", default=os.path.join(here, DEFAULT_FILES["train"]))
    p.add_argument("--model_config", default=os.path.join(here, DEFAULT_FILES["model"]))
    p.add_argument("--no_resume", action="store_true",
                   help="start fresh; earlier checkpoints in checkpoint_dir are moved to previous_<time>/, not deleted")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="e.g. train.num_epochs=3 model.teacher_pretrained=false (VALUE parsed as YAML)")
    return p.parse_args(argv)


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                        "set train.device=auto or cpu, or run on a GPU node")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    # Clusters that bind one GPU per task show each task a single device: index 0, not its local rank.
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def prepare_run_dir(path: str, no_resume: bool) -> None:
    """Creates the run dir and proves it is writable; --no_resume moves old checkpoints aside instead of over them."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"train.checkpoint_dir {path} is not writable ({e.strerror}); choose a writable directory") from None
    remove_stale_temp_files(path)
    old = [f for f in os.listdir(path) if f.endswith(".pth") or f in ("log.jsonl", "config.yaml")]
    if no_resume and old:
        backup = os.path.join(path, time.strftime("previous_%Y%m%d-%H%M%S"))
        os.makedirs(backup)
        for name in old:
            os.replace(os.path.join(path, name), os.path.join(backup, name))
        print(f"--no_resume: moved {len(old)} earlier files to {backup}")


def remove_stale_temp_files(path: str) -> None:
    """A run killed inside save_checkpoint leaves its temp file behind, as large as a checkpoint."""
    for name in os.listdir(path):
        if STALE_TEMP_RE.match(name):
            os.remove(os.path.join(path, name))


def write_config(cfg: Config, path: str) -> None:
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump({**cfg.to_dict(), "meta": run_metadata()}, f, sort_keys=False)


# ----------------------------------------------------------------- data
@dataclass
class Data:
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32] on the training device
    train_labels: torch.Tensor
    diag_images: torch.Tensor  # fixed held-out test batch for the per-epoch collapse diagnostics
    num_classes: int


def build_data(cfg: Config, device: torch.device) -> Data:
    train_images, train_labels, classes = load_split(cfg.data, "train")
    test_images, _, _ = load_split(cfg.data, "test")
    if len(train_images) < cfg.train.batch_size:
        raise UserError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(train_images)} training images "
                        f"(data.max_samples={cfg.data.max_samples}); lower the batch size or use more data")
    pick = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))[:cfg.train.diag_batch_size]
    # The whole uint8 dataset (150 MB for CIFAR) lives on the device: batches are gathered there, no loader workers.
    return Data(train_images.to(device), train_labels.to(device), test_images[pick].to(device), len(classes))


def views_for_epoch(cfg: Config, num_steps: int, world_size: int, rank: int, epoch: int) -> torch.Tensor:
    """Augmentation parameters [steps, B, 6] for this rank, a pure function of (seed, epoch).

    All ranks draw the same global batch of parameters and keep their slice, so a run on W GPUs with batch B sees
    the same views as one process with batch W*B, and a resumed run sees the same views as an uninterrupted one.
    """
    b = cfg.train.batch_size
    generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch + 17)
    params = sample_view_params(num_steps * world_size * b, generator, cfg.train.use_minimal_aug, cfg.train.blur_prob)
    return params.view(num_steps, world_size, b, -1)[:, rank]


def model_inputs(images: torch.Tensor, params: torch.Tensor, cfg: Config, with_teacher: bool):
    """Student input at student_img_size; the teacher gets the same augmented view resized to teacher_img_size."""
    view = render_views(images, params, cfg.model.student_img_size, blur=cfg.train.blur_prob > 0)
    teacher_x = normalize(teacher_view(view, cfg.model.teacher_img_size)) if with_teacher else None
    return normalize(view), teacher_x


def identity_params(n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0], device=device).repeat(n, 1)


# ----------------------------------------------------------------- models
class Trainable(nn.Module):
    """Everything that receives gradients, in one module so DDP wraps (and syncs) all of it.

    forward returns (loss, cls term, patch term); for the supervised objective the terms are cross-entropy and 0.
    """

    def __init__(self, student: nn.Module, criterion: Optional[DistillLoss], head: Optional[nn.Linear],
                 use_cls_token: bool = True):
        super().__init__()
        self.student, self.criterion, self.head = student, criterion, head
        self.use_cls_token = use_cls_token

    def forward(self, x, t_cls=None, t_patch=None, labels=None):
        s_cls, s_patch = student_tokens(self.student, x)
        if self.head is not None:
            logits = self.head(pooled_feature(s_cls, s_patch, self.use_cls_token))
            loss = F.cross_entropy(logits.float(), labels)
            return loss, loss.detach(), torch.zeros_like(loss)
        return self.criterion(s_cls, s_patch, t_cls, t_patch)


def build_teacher_if_needed(cfg: Config, device: torch.device):
    if cfg.train.objective != "distill":
        return None
    from dinov2_patcher import build_teacher  # the teacher module pulls in hub/download logic only when needed
    return build_teacher(cfg.model, device)


def build_trainable(cfg: Config, teacher, num_classes: int, device: torch.device) -> Trainable:
    student = build_student(cfg.model)
    if teacher is None:
        head = nn.Linear(student.num_features, num_classes)
        return Trainable(student, None, head, cfg.model.use_cls_token).to(device)
    student_grid = tuple(student.patch_embed.grid_size)
    criterion = DistillLoss(student.num_features, teacher.embed_dim, student_grid, teacher.grid_size,
                            cfg.train.distill_loss_weights, cfg.model.projection, cfg.model.projection_seed,
                            cfg.model.target_norm, pooled_targets=cfg.train.cache_teacher_features)
    return Trainable(student, criterion, None).to(device)


@torch.no_grad()
def estimate_target_stats(cfg: Config, teacher, criterion: DistillLoss, data: Data, amp) -> None:
    """Teacher-target mean/std over (up to 10k) un-augmented training images, once, for target_norm."""
    n = min(len(data.train_images), TARGET_STATS_MAX_IMAGES)
    # A seeded random subset: image folders are stored class by class, so the first 10k would be two classes.
    pick = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(cfg.train.seed))[:n]
    pick = pick.sort().values.to(data.train_images.device)
    cls_feats, patch_sum, patch_sq, count = [], 0.0, 0.0, 0
    for start in range(0, n, 256):
        images = data.train_images[pick[start:start + 256]]
        _, teacher_x = model_inputs(images, identity_params(len(images), images.device), cfg, True)
        with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            t_cls, t_patch = teacher(teacher_x)
        pooled = criterion.pool_teacher(t_patch.float()).flatten(0, 1)
        cls_feats.append(t_cls.float())
        patch_sum, patch_sq, count = patch_sum + pooled.sum(0), patch_sq + (pooled ** 2).sum(0), count + len(pooled)
    cls_all = torch.cat(cls_feats)
    patch_mean = patch_sum / count
    patch_std = (patch_sq / count - patch_mean ** 2).clamp(min=1e-12).sqrt()
    criterion.set_target_stats(cls_all.mean(0), cls_all.std(0).clamp(min=1e-6), patch_mean, patch_std.clamp(min=1e-6))


# ----------------------------------------------------------------- checkpoints
def checkpoint_state(cfg: Config, trainable: Trainable, optimizer, epoch: int, step_in_epoch: int,
                     global_step: int, epoch_sums: torch.Tensor, plan: Dict[str, int]) -> Dict[str, Any]:
    bare = unwrap(trainable)
    return {
        "student": bare.student.state_dict(),
        "projection": bare.criterion.state_dict() if bare.criterion is not None else None,
        "head": bare.head.state_dict() if bare.head is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": {"global_step": global_step, "name": "warmup_cosine", **plan},
        "scaler": None,  # bf16 autocast needs no loss scaling
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "epoch_sums": epoch_sums.detach().cpu(),
        "config": cfg.to_dict(),
        "rng": capture_rng(),
    }


def check_plan(path: str, stored: Dict[str, Any], plan: Dict[str, int]) -> None:
    """The step plan (steps per epoch, global batch, data size, epochs) must match, or the lr schedule and the
    position inside the epoch would silently mean something else after the resume."""
    changed = [f"{k} {stored[k]} -> {v}" for k, v in plan.items() if k in stored and stored[k] != v]
    if changed:
        raise UserError(f"{path} was written with another step plan ({', '.join(changed)}): resume with the same "
                        f"batch_size, GPU count, data and num_epochs, or use --no_resume / another checkpoint_dir")


def try_resume(cfg: Config, trainable: Trainable, optimizer, path: str, plan: Dict[str, int]) -> Dict[str, Any]:
    """Restores everything that shapes the next step; returns the position to continue from."""
    start = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "epoch_sums": None}
    if not os.path.isfile(path):
        return start
    ckpt = load_checkpoint(path)
    stored = ckpt.get("config") or {}
    if stored.get("model") != cfg.to_dict()["model"]:
        raise UserError(f"{path} was trained with a different model config; use another train.checkpoint_dir or "
                        f"--no_resume (moves the old files aside)")
    if (stored.get("train") or {}).get("objective") != cfg.train.objective:
        # Distill and supervised runs hold different trainable modules: projection vs linear head.
        raise UserError(f"{path} was trained with train.objective={(stored.get('train') or {}).get('objective')}, "
                        f"not {cfg.train.objective}; use another train.checkpoint_dir or --no_resume")
    check_plan(path, ckpt.get("scheduler") or {}, plan)
    bare = unwrap(trainable)
    bare.student.load_state_dict(ckpt["student"])
    if bare.criterion is not None:
        bare.criterion.load_state_dict(ckpt["projection"])
    if bare.head is not None:
        bare.head.load_state_dict(ckpt["head"])
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng(ckpt["rng"])
    print(f"resumed from {path}: epoch {ckpt['epoch']}, step {ckpt['step_in_epoch']} in epoch, "
          f"global step {ckpt['global_step']}")
    return {key: ckpt[key] for key in start}


def trim_log(path: str, completed_epochs: int) -> None:
    """Drops log lines for epochs past the checkpoint we resume from (they will be run again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if _logged_epoch(line) <= completed_epochs]
    with open(path + ".tmp", "w") as f:  # replaced in one step: a kill here must not empty the log
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def _logged_epoch(line: str) -> float:
    """Epoch of a log line; a line cut short by a kill counts as past every epoch, so trim_log drops it."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


# ----------------------------------------------------------------- training
@dataclass
class Run:
    cfg: Config
    info: distributed.DistInfo
    device: torch.device
    amp: Optional[torch.dtype]
    data: Data
    teacher: Optional[nn.Module]
    trainable: nn.Module  # possibly DDP-wrapped / compiled
    optimizer: torch.optim.Optimizer
    schedule: List[float]
    steps_per_epoch: int
    stop: StopSignal = field(default_factory=lambda: StopSignal())
    teacher_cache: Optional[teacher_cache.TeacherCache] = None  # train.cache_teacher_features: targets from disk

    @property
    def latest_path(self) -> str:
        return os.path.join(self.cfg.train.checkpoint_dir, "checkpoint_latest.pth")

    @property
    def plan(self) -> Dict[str, int]:
        return {"steps_per_epoch": self.steps_per_epoch, "total_steps": len(self.schedule),
                "global_batch": self.cfg.train.batch_size * self.info.world_size,
                "num_train_images": len(self.data.train_images)}


def train_step(run: Run, images, labels, params, lr: float, targets=None) -> torch.Tensor:
    """One optimizer step; returns the detached (loss, cls, patch) triple without a host sync.

    `targets` [B, 1 + Ns, D]: cached teacher CLS + pooled patch tokens for these views, instead of the live teacher.
    """
    set_lr(run.optimizer, lr)
    live = run.teacher is not None and targets is None
    x, teacher_x = model_inputs(images, params, run.cfg, live)
    with torch.autocast(run.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
        t_cls = t_patch = None
        if live:
            t_cls, t_patch = run.teacher(teacher_x)
        elif targets is not None:
            t_cls, t_patch = targets[:, 0], targets[:, 1:]
        loss, loss_cls, loss_patch = run.trainable(x, t_cls, t_patch, labels)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return torch.stack([loss.detach(), loss_cls.detach(), loss_patch.detach()]).float()


def check_finite_weights(run: Run, global_step: int) -> None:
    """A finite loss can still be followed by an update to inf/NaN weights: never write those to disk."""
    params = [p.detach() for p in unwrap(run.trainable).parameters()]
    if not torch.isfinite(torch.stack([p.float().abs().amax() for p in params])).all():
        raise NonFiniteLoss(f"non-finite weights after global step {global_step}")


def save_latest(run: Run, epoch: int, step_in_epoch: int, global_step: int, sums: torch.Tensor,
                before: Optional[Callable[[], None]] = None) -> None:
    """checkpoint_latest.pth from rank 0 (after `before`, also rank 0's), all ranks agreeing on success."""
    check_finite_weights(run, global_step)  # on every rank, so all of them stop together
    if run.info.enabled:
        # Every rank resumes with the mean of the partial sums; end_epoch's all-reduce / world size then still
        # gives the mean over all ranks of the whole epoch.
        sums = sums.clone()
        torch.distributed.all_reduce(sums)
        sums /= run.info.world_size

    def write() -> None:
        if before is not None:
            before()
        save_checkpoint(checkpoint_state(run.cfg, run.trainable, run.optimizer, epoch, step_in_epoch, global_step,
                                         sums, run.plan), run.latest_path)
    distributed.on_main_rank(write, run.info.is_main, run.device)


def check_finite(run: Run, sums: torch.Tensor, first_bad: torch.Tensor) -> None:
    """Called at the same step on every rank; they agree, so a NaN on one rank stops all of them."""
    local_bad = not bool(torch.isfinite(sums).all())
    if distributed.any_rank(local_bad, run.device):
        where = f"global step {int(first_bad.item())}" if local_bad else "on another rank"
        raise NonFiniteLoss(f"non-finite loss at {where}")


def epoch_plan(run: Run, epoch: int):
    """This rank's sample indices [S, B], view params [S, B, 6] and cached targets (or None), on the device."""
    cfg, info = run.cfg, run.info

    def indices_for(e: int) -> torch.Tensor:
        return epoch_indices(len(run.data.train_images), cfg.train.batch_size, info.world_size, info.rank,
                             cfg.train.seed, e, run.steps_per_epoch)
    indices = indices_for(epoch)
    if run.teacher_cache is None:
        params, targets = views_for_epoch(cfg, run.steps_per_epoch, info.world_size, info.rank, epoch), None
    else:
        params, targets = run.teacher_cache.epoch_batches(epoch, indices, run.device)
        if epoch + 1 < cfg.train.num_epochs:  # the next epoch's targets are gathered on the host meanwhile
            run.teacher_cache.prefetch(epoch + 1, indices_for(epoch + 1), run.device)
    return indices.to(run.device), params.to(run.device), targets


def train_one_epoch(run: Run, epoch: int, start_step: int, global_step: int, sums: Optional[torch.Tensor]):
    """Runs the epoch from `start_step`; returns (global_step, loss sums, images seen, seconds, stopped mid-epoch)."""
    cfg, device = run.cfg, run.device
    indices, params, targets = epoch_plan(run, epoch)
    sums = torch.zeros(4, device=device) if sums is None else sums.to(device)  # loss, cls, patch, steps
    first_bad = torch.tensor(-1, device=device)
    bar = make_progress(run, epoch, start_step)
    started, seen = time.time(), 0
    stop, done = False, start_step
    for step in range(start_step, run.steps_per_epoch):
        batch = indices[step]
        losses = train_step(run, run.data.train_images[batch], run.data.train_labels[batch], params[step],
                            run.schedule[global_step], None if targets is None else targets[step])
        # Remember the first bad step on the device: no host sync inside the loop.
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses[0]), global_step, first_bad)
        sums += torch.cat([losses, losses.new_ones(1)])
        global_step, seen = global_step + 1, seen + len(batch) * run.info.world_size
        done = step + 1
        at_log = done % cfg.train.log_every == 0 or done == run.steps_per_epoch
        if at_log:
            check_finite(run, sums, first_bad)
            if bar is not None:
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{sums[0].item() / sums[3].item():.4f}")
        # Ranks agree on stopping only where they all look (every step when alone), so they save and exit together.
        if at_log or not run.info.enabled:
            stop = distributed.any_rank(run.stop.requested, device)
        if (cfg.train.save_every and global_step % cfg.train.save_every == 0) or stop:
            check_finite(run, sums, first_bad)
            if done < run.steps_per_epoch:
                save_latest(run, epoch, done, global_step, sums)
            if stop:
                break
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stopped_mid_epoch = stop and done < run.steps_per_epoch
    return global_step, sums, seen, time.time() - started, stopped_mid_epoch


def make_progress(run: Run, epoch: int, start_step: int):
    if not (run.info.is_main and run.cfg.train.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=run.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{run.cfg.train.num_epochs}",
                dynamic_ncols=True)


@torch.no_grad()
def epoch_diagnostics(run: Run) -> Dict[str, Optional[float]]:
    """Collapse diagnostics on the fixed held-out batch, without augmentation."""
    bare = unwrap(run.trainable)
    bare.eval()
    images = run.data.diag_images
    x, teacher_x = model_inputs(images, identity_params(len(images), run.device), run.cfg, run.teacher is not None)
    with torch.autocast(run.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
        s_cls, s_patch = student_tokens(bare.student, x)
        # The bare teacher: a compiled one would recompile for the diagnostic batch size.
        t_cls = unwrap(run.teacher)(teacher_x)[0] if run.teacher is not None else None
    bare.train()
    feature = pooled_feature(s_cls, s_patch, run.cfg.model.use_cls_token).float()
    out = {"student_pairwise_cos": metrics.mean_pairwise_cosine(feature), "student_feature_std": metrics.feature_std(feature),
           "teacher_pairwise_cos": None, "student_teacher_cos": None}
    if t_cls is not None:
        target, _ = bare.criterion.normalize_targets(t_cls.float(), t_cls.float()[:, None])
        out["teacher_pairwise_cos"] = metrics.mean_pairwise_cosine(t_cls.float())
        out["student_teacher_cos"] = metrics.mean_cosine(bare.criterion.cls_proj(s_cls.float()), target)
    return out


def end_epoch(run: Run, epoch: int, global_step: int, sums, seen: int, seconds: float) -> None:
    """Logs the epoch (rank 0), writes checkpoint_latest and, if asked for, checkpoint_epoch_{N}."""
    completed = epoch + 1
    totals = sums.clone()
    if run.info.enabled:
        torch.distributed.all_reduce(totals)
        totals[:3] /= run.info.world_size
        totals[3] /= run.info.world_size
    means = (totals[:3] / totals[3]).tolist()
    diagnostics = epoch_diagnostics(run) if run.info.is_main else {}
    record = {"epoch": completed, "global_step": global_step, "loss": means[0], "loss_cls": means[1],
              "loss_patch": means[2], "lr": run.schedule[global_step - 1], "img_per_s": seen / max(seconds, 1e-9),
              "seconds": seconds, **diagnostics}

    def epoch_outputs() -> None:
        # Epoch file and log line before checkpoint_latest: a kill in between resumes before this epoch and writes
        # both again, instead of resuming past an epoch whose checkpoint_epoch_N.pth was never written.
        if completed in run.cfg.train.save_epochs:
            state = checkpoint_state(run.cfg, run.trainable, run.optimizer, completed, 0, global_step, torch.zeros(4),
                                     run.plan)
            save_checkpoint(state, os.path.join(run.cfg.train.checkpoint_dir, f"checkpoint_epoch_{completed}.pth"))
        log_record(run, record)
    save_latest(run, completed, 0, global_step, torch.zeros(4), before=epoch_outputs)


def log_record(run: Run, record: Dict[str, Any]) -> None:
    with open(os.path.join(run.cfg.train.checkpoint_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def train_loop(run: Run, start: Dict[str, Any]) -> int:
    cfg = run.cfg
    if start["global_step"] == 0 and run.info.is_main:
        # Epoch 0: the untrained student's diagnostics, the baseline the later epochs are read against.
        log_record(run, {"epoch": 0, "global_step": 0, "loss": None, "loss_cls": None, "loss_patch": None,
                         "lr": None, "img_per_s": None, "seconds": 0.0, **epoch_diagnostics(run)})
    global_step, sums = start["global_step"], start["epoch_sums"]
    last_epoch = min(cfg.train.num_epochs, cfg.train.stop_after_epoch or cfg.train.num_epochs)
    for epoch in range(start["epoch"], last_epoch):
        step_in_epoch = start["step_in_epoch"] if epoch == start["epoch"] else 0
        global_step, sums, seen, seconds, stopped = train_one_epoch(run, epoch, step_in_epoch, global_step,
                                                                    sums if epoch == start["epoch"] else None)
        if stopped:
            print(f"stop requested: saved {run.latest_path} at epoch {epoch + 1}, step "
                  f"{global_step - epoch * run.steps_per_epoch}; exiting with {EXIT_REQUEUE} for requeue", flush=True)
            return EXIT_REQUEUE
        end_epoch(run, epoch, global_step, sums, seen, seconds)
        sums = None
        if distributed.any_rank(run.stop.requested, run.device):
            print(f"stop requested: saved {run.latest_path} after epoch {epoch + 1}; exiting with {EXIT_REQUEUE}",
                  flush=True)
            return EXIT_REQUEUE
    return 0


class StopSignal:
    """SIGUSR1 (SLURM's pre-timeout signal) and SIGTERM (preemption) ask for a save and exit at the next step.

    Installed for the whole of train(), set-up included, and the previous handlers restored after, so in-process
    callers (run_experiments.py) get their own handling back between runs.
    """
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True


# ----------------------------------------------------------------- main
def build_run(cfg: Config, info: distributed.DistInfo, device: torch.device) -> Run:
    data = build_data(cfg, device)
    torch.manual_seed(cfg.train.seed)  # a random-init teacher (smoke runs) is the same on every rank and rerun
    teacher = build_teacher_if_needed(cfg, device)
    torch.manual_seed(cfg.train.seed)  # identical student init on every rank and in every rerun
    trainable = build_trainable(cfg, teacher, data.num_classes, device)
    optimizer = build_optimizer([trainable], cfg.train.learning_rate, cfg.train.weight_decay, device)
    cache = None
    if cfg.train.cache_teacher_features and teacher is not None:
        cache = teacher_cache.load_or_build(cfg, teacher, trainable.criterion, data.train_images,
                                            autocast_dtype(cfg.train.precision, device), info.is_main)
    torch.manual_seed(cfg.train.seed + info.rank)  # drop path differs per rank, as in DINO
    global_batch = cfg.train.batch_size * info.world_size
    steps = len(data.train_images) // global_batch
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    total = steps * cfg.train.num_epochs
    schedule = lr_schedule(total, int(round(cfg.train.warmup_epochs * steps)), cfg.train.learning_rate,
                           cfg.train.min_lr)
    amp = autocast_dtype(cfg.train.precision, device)
    return Run(cfg, info, device, amp, data, teacher, trainable, optimizer, schedule, steps, teacher_cache=cache)


def wrap_for_speed(run: Run) -> None:
    if run.info.enabled:
        ids = [run.device.index] if run.device.type == "cuda" else None
        # Buffers (pooling matrices, target statistics) are identical on every rank: no per-step broadcast.
        run.trainable = nn.parallel.DistributedDataParallel(run.trainable, device_ids=ids, broadcast_buffers=False)
    if run.cfg.train.compile:
        run.trainable = torch.compile(run.trainable)
        if run.teacher is not None:
            run.teacher = torch.compile(run.teacher)


def train(cfg: Config, no_resume: bool = False) -> int:
    """Trains `cfg` (from checkpoint_latest.pth in its checkpoint_dir unless no_resume); returns the exit code."""
    with StopSignal() as stop:
        return train_with(cfg, no_resume, stop)


def train_with(cfg: Config, no_resume: bool, stop: StopSignal) -> int:
    info = distributed.init_distributed(resolve_device(cfg.train.device, 0).type)
    device = resolve_device(cfg.train.device, info.local_rank)
    distributed.on_main_rank(lambda: prepare_run_dir(cfg.train.checkpoint_dir, no_resume), info.is_main, device)
    run = build_run(cfg, info, device)
    start = try_resume(cfg, run.trainable, run.optimizer, run.latest_path, run.plan)
    criterion = run.trainable.criterion
    if criterion is not None and cfg.model.target_norm != "none" and start["global_step"] == 0:
        estimate_target_stats(cfg, run.teacher, criterion, run.data, run.amp)
    if info.is_main:
        write_config(cfg, cfg.train.checkpoint_dir)
        trim_log(os.path.join(cfg.train.checkpoint_dir, "log.jsonl"), start["epoch"] if start["global_step"] else -1)
        print(f"{run.steps_per_epoch} steps/epoch x {cfg.train.num_epochs} epochs, global batch "
              f"{cfg.train.batch_size * info.world_size}, device {device}, autocast {run.amp}", flush=True)
    wrap_for_speed(run)
    run.stop = stop
    try:
        return train_loop(run, start)
    except NonFiniteLoss as e:
        kept = (f"the last good checkpoint {run.latest_path} is kept" if os.path.isfile(run.latest_path)
                else "no checkpoint had been written yet")
        print(f"error: {e}; stopped, {kept}. Lower train.learning_rate or use precision fp32", file=sys.stderr)
        return EXIT_NONFINITE


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*xFormers.*")
    try:
        cfg = load_config(args.data_config, args.train_config, args.model_config, args.override)
        code = train(cfg, args.no_resume)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.cleanup(together=False)
        return 2
    distributed.cleanup(together=code == 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
