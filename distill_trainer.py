"""Feature distillation from a frozen DINOv2 teacher into a ViT student trained from scratch on
CIFAR.

Launch (defaults: DINOv2 ViT-B/14 at 224 px -> ViT-S/16 at 96 px, CIFAR-10, 50 epochs):
    python distill_trainer.py
    python distill_trainer.py --data_config data_config.yaml --train_config train_config_kd.yaml \
        --model_config model_config_kd.yaml --override train.num_epochs=3
        model.teacher_pretrained=false
    torchrun --standalone --nproc_per_node 4 distill_trainer.py     # one node, 4 GPUs
    sbatch scripts/train.sbatch                                     # SLURM (srun, one task per GPU)

In-process (run_experiments.py): `distill_trainer.train(cfg)` with a config.Config; returns the exit
code.

Writes config.yaml, log.jsonl, checkpoint_epoch_{N}.pth and checkpoint_latest.pth to
train.checkpoint_dir and resumes from checkpoint_latest.pth unless --no_resume. Exit codes: 0 done,
2 a user mistake (one line on stderr), 3 non-finite loss, 75 stopped by SIGUSR1/SIGTERM after saving
(the sbatch wrapper requeues), 130 stopped by Ctrl-C after saving (a second Ctrl-C stops at once).
"""
from __future__ import annotations

import argparse
import copy
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import distributed
import metrics
import teacher_cache
from checkpoint import (RunDirLock, atomic_write, capture_rng, check_same_inputs, load_checkpoint,
                        restore_rng, run_inputs, run_metadata, save_checkpoint, teacher_record)
from config import DEFAULT_FILES, ArgumentParser, Config, UserError, load_config, one_line_warnings
from data_loader import data_digest, epoch_indices, load_split
from distill_loss import build_criterion
from loggers import Loggers, open_loggers
from models import (autocast, autocast_dtype, check_timm_kwargs, hold_teacher, initial_student,
                    pooled_feature, student_tokens)
from optimizer import build_optimizer, load_optimizer_state, lr_schedule, optimizer_state
from train_step import Data, Run, Step, StepMode, Trainable, cuda_graphs_enabled, make_train_step
from transforms import identity_params, model_inputs, sample_view_params

EXIT_NONFINITE = 3
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
TARGET_STATS_MAX_IMAGES = 10000
# The names atomic_write gives the temp files of a run's files: checkpoint_latest.pth.<random>.tmp,
# log.jsonl.<...>
STALE_TEMP_RE = re.compile(
    r"(checkpoint_(latest|epoch_\d+)\.pth|log\.jsonl|config\.yaml)\.[^.]+\.tmp$"
)



RESUME_WAY_OUT = ("resume with the stored values and inputs (see config.yaml there), or start over "
                  "with --no_resume (moves the old files aside) or another train.checkpoint_dir")


class NonFiniteLoss(Exception):
    pass


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                       epilog="Every config key, its default and meaning: docs/configuration.md.")
    # defaults are the repo's files, from any working directory
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--data_config", default=os.path.join(here, DEFAULT_FILES["data"]))
    p.add_argument("--train_config", default=os.path.join(here, DEFAULT_FILES["train"]))
    p.add_argument("--model_config", default=os.path.join(here, DEFAULT_FILES["model"]))
    p.add_argument(
        "--no_resume",
        action="store_true",
        help=(
            "start fresh; earlier checkpoints in checkpoint_dir are moved to previous_<time>/, not"
            " deleted"
        ),
    )
    p.add_override("e.g. train.num_epochs=3 model.teacher_pretrained=false (VALUE parsed as YAML)")
    return p.parse_args(argv)


@one_line_warnings()
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
    except KeyboardInterrupt:  # a second Ctrl-C: StopSignal raises it at once, wherever the run was
        print(
            "interrupted twice (Ctrl-C): stopped at once; rerun the same command to resume from the"
            " last checkpoint_latest.pth",
            file=sys.stderr,
        )
        distributed.cleanup(together=False)
        return EXIT_INTERRUPTED
    distributed.cleanup(together=code == 0)
    return code


def train(cfg: Config, no_resume: bool = False) -> int:
    """Trains `cfg`, resuming from checkpoint_latest.pth in its checkpoint_dir unless no_resume;
    returns the exit code.

    Stop signals are caught for the whole call, set-up included, and the previous handlers restored
    after. Rank 0 holds the run directory's lock for the whole call: a second trainer on the same
    checkpoint_dir stops at once.
    """
    with StopSignal() as stop, RunDirLock(cfg.train.checkpoint_dir) as lock, \
            contextlib.ExitStack() as on_exit:
        # ============ process group, device, run directory ============
        info = distributed.init_distributed(resolve_device(cfg.train.device, 0).type)
        device = resolve_device(cfg.train.device, info.local_rank)
        distributed.on_main_rank(lambda: prepare_run_dir(lock, no_resume), info.is_main, device)

        # ============ data, teacher, student, optimizer, lr schedule ============
        run = build_run(cfg, info, device)

        # ============ resume, or start: target statistics, config.yaml, the untrained student's
        # diagnostics ====
        start, changed = resume(run)
        fresh = start.global_step == 0
        if info.is_main and cfg.train.loggers:
            live = open_loggers(cfg.train.loggers, cfg.train.checkpoint_dir, cfg.to_dict(),
                                start.global_step, fresh)
            run = dataclasses.replace(run, loggers=on_exit.enter_context(live))
        if fresh and run.teacher is not None and cfg.model.target_norm != "none":
            estimate_target_stats(run)
        step = make_train_step(run)
        distributed.on_main_rank(lambda: start_outputs(run, start, changed, step.mode),
                                 info.is_main, device)

        # ============ epochs ============
        try:
            for epoch in range(start.epoch, last_epoch(cfg)):
                epoch_start = (
                    start
                    if epoch == start.epoch
                    else Position(epoch, 0, epoch * run.steps_per_epoch)
                )
                result = train_one_epoch(run, step, epoch_start, stop)
                if result.stopped:
                    return stop_exit(run, stop, f"at epoch {epoch + 1}, step {result.steps_done}")
                end_epoch(run, epoch, result)
                if distributed.any_rank(stop.requested, device):
                    return stop_exit(run, stop, f"after epoch {epoch + 1}")
        except NonFiniteLoss as e:
            kept = (
                f"the last good checkpoint {run.latest_path} is kept"
                if os.path.isfile(run.latest_path)
                else "no checkpoint had been written yet"
            )
            print(
                f"error: {e}; stopped, {kept}. Lower train.learning_rate or use precision fp32",
                file=sys.stderr,
            )
            return EXIT_NONFINITE
        line = finish_line(run, start.epoch)
        if line and info.is_main:
            print(line, flush=True)
    return 0


def finish_line(run: Run, first_epoch: int) -> Optional[str]:
    """What an exit 0 that did not train every epoch means (None: it trained to its end)."""
    cfg, total = run.cfg, run.cfg.train.num_epochs
    stop_after, last = cfg.train.stop_after_epoch, last_epoch(run.cfg)
    if first_epoch >= total:
        return (f"run already complete: {run.latest_path} holds all {total} epochs, nothing was "
                f"trained; to train again use --no_resume (moves the old files aside) or another "
                f"train.checkpoint_dir")
    if first_epoch >= last:
        return (f"nothing trained: {run.latest_path} is at epoch {first_epoch} of {total} and "
                f"train.stop_after_epoch={stop_after}; raise or remove it to continue")
    if last < total:
        return (f"stopped after epoch {last} of {total} (train.stop_after_epoch={stop_after}); "
                f"rerun without it to continue from {run.latest_path}")
    return None


# ----------------------------------------------------------------- the epoch
@dataclass(frozen=True)
class Position:
    """Where training stands: epoch (0-based, = epochs completed), step inside it, global step, loss
    sums so far."""
    epoch: int
    step_in_epoch: int
    global_step: int
    # [loss, *terms, steps] of the steps already done this epoch
    epoch_sums: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class EpochResult:
    sums: torch.Tensor  # [loss, *terms, steps] summed over the epoch's steps (on the device)
    seen: int  # images, all ranks
    seconds: float
    steps_done: int  # steps of the epoch completed, counting those before a resume
    stopped: bool  # a stop signal ended the epoch early (checkpoint_latest.pth holds the position)


def train_one_epoch(
    run: Run, step: Step, start: Position, stop: Optional[StopSignal] = None
) -> EpochResult:
    """Runs epoch `start.epoch` from `start.step_in_epoch`; no host sync except every log_every
    steps.

    Each step's losses go to a row of a device buffer (one copy per step); sums, the progress bar
    and the non-finite check read the buffer only where the loop looks (log_every, saves, the end).
    """
    cfg, device, epoch, n = run.cfg, run.device, start.epoch, run.steps_per_epoch
    indices, params, targets = epoch_batches(run, epoch)
    width = 1 + len(run.trainable.loss.term_names)
    losses = torch.zeros(n, width, device=device)  # (loss, *terms) per step of this epoch
    first = start.step_in_epoch

    # [loss, *terms, steps] since the epoch began, the resumed part included
    def sums(done: int) -> torch.Tensor:
        prior = torch.zeros(width + 1) if start.epoch_sums is None else start.epoch_sums
        return prior.to(device) + F.pad(losses[first:done].sum(0), (0, 1), value=done - first)
    bar = make_progress(run, epoch, first)
    started, seen, stopped, done = time.time(), 0, False, first
    for i in range(first, n):
        global_step = epoch * n + i
        losses[i] = step(
            indices[i], params[i], global_step, None if targets is None else targets[i]
        )
        seen, done = seen + len(indices[i]) * run.info.world_size, i + 1
        at_log = done % cfg.train.log_every == 0 or done == n
        if at_log:
            check_finite(run, losses, epoch, first, done)
            if run.loggers:
                window_start = max(first, (done - 1) // cfg.train.log_every * cfg.train.log_every)
                log_window(run, losses[window_start:done], global_step)
            if bar is not None:
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{losses[first:done, 0].mean().item():.4f}")
        # Ranks agree on stopping only where they all look (every step when alone), so they save and
        # exit together.
        if stop is not None and (at_log or not run.info.enabled):
            stopped = distributed.any_rank(stop.requested, device)
        if (cfg.train.save_every and (global_step + 1) % cfg.train.save_every == 0) or stopped:
            check_finite(run, losses, epoch, first, done)
            if done < n:
                save_latest(run, Position(epoch, done, global_step + 1, sums(done)))
            if stopped:
                break
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return EpochResult(sums(done), seen, time.time() - started, done, stopped and done < n)


def log_window(run: Run, window: torch.Tensor, global_step: int) -> None:
    """The mean losses of a log_every window, to the loggers only (log.jsonl has epochs)."""
    names = ["train/loss", *(f"train/loss_{n}" for n in run.trainable.loss.term_names)]
    values = {**dict(zip(names, window.mean(0).tolist())), "train/lr": run.schedule[global_step]}
    run.loggers.scalars(values, global_step + 1)  # the x axis of the epoch records: steps completed


def epoch_batches(run: Run, epoch: int):
    """This rank's sample indices [S, B], view params [S, B, 6] and cached targets (or None), on the
    device."""
    cfg, info = run.cfg, run.info

    def indices_for(e: int) -> torch.Tensor:
        return epoch_indices(
            len(run.data.train_images),
            cfg.train.batch_size, info.world_size, info.rank, cfg.train.seed, e,
            run.steps_per_epoch,
        )
    indices = indices_for(epoch)
    if run.teacher_cache is None:
        params, targets = (
            views_for_epoch(cfg, run.steps_per_epoch, info.world_size, info.rank, epoch),
            None,
        )
    else:
        params, targets = run.teacher_cache.epoch_batches(epoch, indices, run.device)
        # the next epoch's targets are gathered on the host meanwhile
        if epoch + 1 < cfg.train.num_epochs:
            run.teacher_cache.prefetch(epoch + 1, indices_for(epoch + 1), run.device)
    return indices.to(run.device), params.to(run.device), targets


def views_for_epoch(
    cfg: Config, num_steps: int, world_size: int, rank: int, epoch: int
) -> torch.Tensor:
    """Augmentation parameters [steps, B, 6] for this rank, a pure function of (seed, epoch).

    All ranks draw the same global batch of parameters and keep their slice, so a run on W GPUs with
    batch B sees the same views as one process with batch W*B, and a resumed run sees the same views
    as an uninterrupted one.
    """
    b = cfg.train.batch_size
    generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch + 17)
    params = sample_view_params(
        num_steps * world_size * b, generator, cfg.train.use_minimal_aug, cfg.train.blur_prob
    )
    return params.view(num_steps, world_size, b, -1)[:, rank]


def last_epoch(cfg: Config) -> int:
    return min(cfg.train.num_epochs, cfg.train.stop_after_epoch or cfg.train.num_epochs)


def make_progress(run: Run, epoch: int, start_step: int):
    if not (run.info.is_main and run.cfg.train.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(
        total=run.steps_per_epoch,
        initial=start_step,
        desc=f"epoch {epoch + 1}/{run.cfg.train.num_epochs}",
        dynamic_ncols=True,
    )


# ----------------------------------------------------------------- building the run
def build_run(cfg: Config, info: distributed.DistInfo, device: torch.device) -> Run:
    # First what needs no data: an impossible cuda_graphs=true or a kwarg timm would ignore fails at
    # once.
    graphs = cuda_graphs_enabled(cfg, info, device)
    check_timm_kwargs(cfg.model.student_name, cfg.model.student_kwargs, "model.student_kwargs")
    if cfg.train.objective == "distill" and cfg.model.teacher_source == "timm":
        from dinov2_patcher import timm_name
        check_timm_kwargs(
            timm_name(cfg.model.teacher_name), cfg.model.teacher_kwargs, "model.teacher_kwargs"
        )
    amp = autocast_dtype(cfg.train.precision, device)
    if cfg.train.objective == "distill":
        from dinov2_patcher import check_weights_file
        check_weights_file(cfg.model)
    data = build_data(cfg, device)
    teacher = None
    if cfg.train.objective == "distill":
        # the teacher module pulls in hub/download logic only when needed
        from dinov2_patcher import build_teacher
        # a random-init teacher (smoke runs) is the same on every rank and rerun
        torch.manual_seed(cfg.train.seed)
        loaded = build_teacher(cfg.model, device, targets=True)
        # The digest is of the weights as loaded (fp32), not as held: a bf16 run resumed on CPU is
        # the same run.
        teacher_id = teacher_record(cfg.model.teacher_weights, lambda: loaded)
        teacher = hold_teacher(loaded, amp)
    else:
        teacher_id = None
    trainable = build_trainable(cfg, teacher, data.num_classes).to(device)
    optimizer = build_optimizer(
        [trainable], cfg.train.learning_rate, cfg.train.weight_decay, device, lr_as_tensor=graphs
    )
    cache = None
    if cfg.train.cache_teacher_features and teacher is not None:
        cache = teacher_cache.load_or_build(
            cfg, teacher, trainable.criterion, data.train_images, amp, info.is_main
        )
    torch.manual_seed(cfg.train.seed + info.rank)  # drop path differs per rank, as in DINO
    steps = len(data.train_images) // (cfg.train.batch_size * info.world_size)
    steps = min(steps, cfg.train.max_steps_per_epoch or steps)
    schedule = lr_schedule(
        steps * cfg.train.num_epochs,
        int(round(cfg.train.warmup_epochs * steps)),
        cfg.train.learning_rate,
        cfg.train.min_lr,
    )
    inputs = run_inputs(data.digest, teacher_id)
    ema = None
    if cfg.train.ema_decay is not None:
        ema = copy.deepcopy(trainable.student).requires_grad_(False)
    return Run(cfg, info, device, amp, data, teacher, trainable, optimizer, schedule, steps, cache,
               graphs, inputs, ema)


def current_inputs(cfg: Config, stored: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The run inputs `cfg` names now, computed as build_run does, for run_experiments' reuse of
    a finished arm. The teacher is built (on the CPU) only when its file changed since `stored`
    (a checkpoint's inputs)."""
    images, labels, _ = load_split(cfg.data, "train")
    teacher = None
    if cfg.train.objective == "distill":
        def build() -> nn.Module:
            from dinov2_patcher import build_teacher
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)  # as build_run: a random init is the run's
                return build_teacher(cfg.model, torch.device("cpu"), targets=True)
        teacher = teacher_record(cfg.model.teacher_weights, build, (stored or {}).get("teacher"))
    return run_inputs(data_digest(images, labels), teacher)


def build_data(cfg: Config, device: torch.device) -> Data:
    train_images, train_labels, classes = load_split(cfg.data, "train")
    test_images, _, _ = load_split(cfg.data, "test")
    if len(train_images) < cfg.train.batch_size:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} exceeds the {len(train_images)} training"
            f" images (data.max_samples={cfg.data.max_samples}); lower the batch size or use more"
            " data"
        )
    if len(test_images) < 2:
        raise UserError(f"{cfg.data.dataset_root}: {len(test_images)} test image(s); the per-epoch "
                        f"diagnostics (pairwise statistics) need at least 2: add test images or "
                        f"raise data.max_samples")
    pick = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))[
        : cfg.train.diag_batch_size
    ]
    # The whole uint8 dataset (150 MB for CIFAR) lives on the device: batches are gathered there, no
    # loader workers.
    return Data(train_images.to(device), train_labels.to(device), test_images[pick].to(device),
                len(classes), data_digest(train_images, train_labels))


def build_trainable(cfg: Config, teacher: Optional[nn.Module], num_classes: int) -> Trainable:
    student = initial_student(cfg)
    criterion = build_criterion(cfg, student.num_features, student.patch_embed.grid_size,
                                None if teacher is None else teacher.target_dim,
                                None if teacher is None else teacher.grid_size, num_classes)
    return Trainable(student, criterion)


@torch.no_grad()
def estimate_target_stats(run: Run) -> None:
    """Teacher-target mean/std over (up to 10k) training images, once, for target_norm.

    Each image is seen through one augmented view drawn as in training (crop/flip,
    train.use_minimal_aug, train.blur_prob; target_stats_views), so the statistics describe the
    targets the loss will normalize.
    """
    images_all, cfg, criterion = run.data.train_images, run.cfg, run.trainable.criterion
    n = min(len(images_all), TARGET_STATS_MAX_IMAGES)
    # A seeded random subset: image folders are stored class by class, so the first 10k would be two
    # classes.
    pick = torch.randperm(len(images_all), generator=torch.Generator().manual_seed(cfg.train.seed))[
        :n
    ]
    pick = pick.sort().values.to(images_all.device)
    params = target_stats_views(cfg, n).to(images_all.device)
    cls_feats, patch_sum, patch_sq, count = [], 0.0, 0.0, 0
    for start in range(0, n, 256):
        images = images_all[pick[start:start + 256]]
        _, teacher_x = model_inputs(images, params[start:start + 256], cfg.model.student_img_size,
                                    cfg.model.teacher_img_size, blur=cfg.train.blur_prob > 0)
        with autocast(run.device, run.amp):
            t_cls, t_patch = run.teacher(teacher_x)
        pooled = criterion.pool_teacher(t_patch.float()).flatten(0, 1).double()
        cls_feats.append(t_cls.float())
        patch_sum, patch_sq, count = (
            patch_sum + pooled.sum(0),
            patch_sq + (pooled**2).sum(0),
            count + len(pooled),
        )
    cls_all = torch.cat(cls_feats)
    patch_mean = patch_sum / count
    patch_std = (patch_sq / count - patch_mean ** 2).clamp(min=1e-12).sqrt()
    criterion.set_target_stats(cls_all.mean(0), cls_all.std(0).clamp(min=1e-6), patch_mean.float(),
                               patch_std.float().clamp(min=1e-6))


def target_stats_views(cfg: Config, n: int) -> torch.Tensor:
    """View params [n, 6] for the target statistics: sampled like a training epoch's, from their own
    stream."""
    # A hash of the seed, not seed + k: the stream must not coincide with any epoch's
    # (views_for_epoch).
    stream = int(hashlib.sha256(f"target_stats:{cfg.train.seed}".encode()).hexdigest()[:15], 16)
    return sample_view_params(n, torch.Generator().manual_seed(stream), cfg.train.use_minimal_aug,
                              cfg.train.blur_prob)


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "train.device=cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
            "set train.device=auto or cpu, or run on a GPU node"
        )
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    # Clusters that bind one GPU per task show each task a single device: index 0, not its local
    # rank.
    return torch.device("cuda", local_rank % torch.cuda.device_count())


# --------------------------------------------------------------- run directory, checkpoints, resume
def prepare_run_dir(lock: RunDirLock, no_resume: bool) -> None:
    """Locks the run dir (creating it: the lock file also proves it writable) before anything in it
    is touched, removes temp files of a killed write; --no_resume moves old checkpoints aside
    instead of over them."""
    lock.acquire()
    path = lock.directory
    # temp files of a run killed inside a write, as large as a checkpoint
    for name in os.listdir(path):
        if STALE_TEMP_RE.match(name):
            os.remove(os.path.join(path, name))
    # The evaluator's default outputs too: beside new checkpoints they would describe the old run.
    old = [f for f in os.listdir(path) if f.endswith(".pth") or f in ("log.jsonl", "config.yaml")
           or f in ("eval_results.json", "eval_results.md", "eval_results.png",
                    "eval_predictions.npz")]
    job = requeued_job(path)
    if no_resume and old and job:
        print(f"SLURM job {job} restarted (restart {os.environ['SLURM_RESTART_COUNT']}): resuming "
              f"its own run; --no_resume applies to a job's first start only", flush=True)
    elif no_resume and old:
        backup = os.path.join(path, time.strftime("previous_%Y%m%d-%H%M%S"))
        os.makedirs(backup)
        for name in old:
            os.replace(os.path.join(path, name), os.path.join(backup, name))
        print(f"--no_resume: moved {len(old)} earlier files to {backup}")


def requeued_job(run_dir: str) -> Optional[str]:
    """The SLURM job id if this process is a requeued start of the job whose config.yaml is in
    run_dir.

    A preempted job restarts with its original arguments, --no_resume included; starting fresh
    then would throw the job's own progress away at every preemption. The job id in config.yaml
    tells the job's own run from an older one.
    """
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    if not job or not restarts.isdigit() or int(restarts) < 1:
        return None
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            meta = (yaml.safe_load(f) or {}).get("meta") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return job if str(meta.get("slurm_job_id")) == job else None


def start_outputs(run: Run, start: Position, changed: Dict[str, Tuple[Any, Any]],
                  mode: StepMode) -> None:
    """Rank 0, before the first step: config.yaml, the log cut back to the checkpoint resumed from,
    a note of the harmless settings changed since, and for a fresh run the untrained student's
    diagnostics as epoch 0. The first record this invocation writes ("resumed", or epoch 0) names
    the step mode and why."""
    cfg, fresh = run.cfg, start.global_step == 0
    write_config(cfg)
    trim_log(cfg.train.checkpoint_dir, completed_epochs=-1 if fresh else start.epoch)
    print(f"{run.steps_per_epoch} steps/epoch x {cfg.train.num_epochs} epochs, global batch "
          f"{run.plan['global_batch']}, device {run.device}, autocast {run.amp}, "
          f"step {mode.name} ({mode.reason})",
          flush=True)
    if changed:
        event = {"event": "resumed", "after_epoch": start.epoch, "global_step": start.global_step,
                 "changed": {key: list(values) for key, values in changed.items()}, **mode.record()}
        log_record(cfg, event, run.loggers)
    if fresh:
        losses = dict.fromkeys(["loss", *(f"loss_{n}" for n in run.trainable.loss.term_names)])
        untrained = {"epoch": 0, "global_step": 0, **losses, "lr": None, "img_per_s": None,
                     "seconds": 0.0, **mode.record(), **epoch_diagnostics(run)}
        log_record(cfg, untrained, run.loggers)


def write_config(cfg: Config) -> None:
    # The job id tells a requeued job its own run (requeued_job).
    meta = {**run_metadata(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    text = yaml.safe_dump({**cfg.to_dict(), "meta": meta}, sort_keys=False)
    atomic_write(
        os.path.join(cfg.train.checkpoint_dir, "config.yaml"), lambda f: f.write(text.encode())
    )


def checkpoint_state(run: Run, position: Position) -> Dict[str, Any]:
    bare = run.trainable
    width = 2 + len(bare.loss.term_names)  # loss, terms, steps
    sums = position.epoch_sums if position.epoch_sums is not None else torch.zeros(width)
    return {
        "student": bare.student.state_dict(),
        "projection": bare.criterion.state_dict() if bare.criterion is not None else None,
        "head": bare.head.state_dict() if bare.head is not None else None,
        "student_ema": run.ema.state_dict() if run.ema is not None else None,  # a student's state
        "optimizer": optimizer_state(run.optimizer),
        "scheduler": {"global_step": position.global_step, "name": "warmup_cosine", **run.plan},
        "scaler": None,  # bf16 autocast needs no loss scaling
        "epoch": position.epoch,
        "step_in_epoch": position.step_in_epoch,
        "global_step": position.global_step,
        "epoch_sums": sums.detach().cpu(),
        "config": run.cfg.to_dict(),
        "inputs": run.inputs,
        "rng": capture_rng(),
    }


def resume(run: Run) -> Tuple[Position, Dict[str, Tuple[Any, Any]]]:
    """Restores everything that shapes the next step from checkpoint_latest.pth; returns where to
    continue and the harmless settings (config.HARMLESS_KEYS) that differ from the checkpoint's,
    {key: (stored, now)}."""
    path, cfg = run.latest_path, run.cfg
    if not os.path.isfile(path):
        return Position(0, 0, 0), {}
    ckpt = load_checkpoint(path)
    # The epochs already trained used the stored values and inputs: another value of a key that
    # shapes the result, other images or another teacher would make the finished run a mix of
    # two, recorded as the second.
    harmless = check_same_inputs(path, ckpt, cfg.to_dict(), run.inputs, RESUME_WAY_OUT)
    stored_plan = ckpt.get("scheduler") or {}
    changed = [
        f"{k} {stored_plan[k]} -> {v}"
        for k, v in run.plan.items()
        if k in stored_plan and stored_plan[k] != v
    ]
    # the lr schedule and the position inside the epoch would silently mean something else
    if changed:
        raise UserError(
            f"{path} was written with another step plan ({', '.join(changed)}): resume with the"
            " same batch_size, GPU count, data and num_epochs, or use --no_resume / another"
            " checkpoint_dir"
        )
    bare = run.trainable
    bare.student.load_state_dict(ckpt["student"])
    if bare.criterion is not None:
        bare.criterion.load_state_dict(ckpt["projection"])
    if bare.head is not None:
        bare.head.load_state_dict(ckpt["head"])
    if run.ema is not None:  # ema_decay is not harmless: a checkpoint of an EMA run has student_ema
        run.ema.load_state_dict(ckpt["student_ema"])
    load_optimizer_state(run.optimizer, ckpt["optimizer"])
    restore_rng(ckpt["rng"])
    print(f"resumed from {path}: epoch {ckpt['epoch']}, step {ckpt['step_in_epoch']} in epoch, "
          f"global step {ckpt['global_step']}")
    sums = stored_epoch_sums(ckpt["epoch_sums"], bare.loss.term_names)
    return Position(ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"], sums), harmless


def stored_epoch_sums(sums: torch.Tensor, term_names) -> torch.Tensor:
    """A checkpoint's [loss, *terms, steps]. Supervised checkpoints written before the terms were
    named hold [loss, cross-entropy, 0, steps]: the fixed 0 column is dropped."""
    if term_names == ("ce",) and sums.numel() == 4:
        return sums[[0, 1, 3]]
    return sums


def save_latest(run: Run, position: Position, before: Optional[Callable[[], None]] = None) -> None:
    """checkpoint_latest.pth from rank 0 (after `before`, also rank 0's), all ranks agreeing on
    success."""
    check_finite_weights(run, position.global_step)  # on every rank, so all of them stop together
    if run.info.enabled and position.epoch_sums is not None:
        # Every rank resumes with the mean of the partial sums; end_epoch's all-reduce / world size
        # then still gives the mean over all ranks of the whole epoch.
        sums = position.epoch_sums.clone()
        torch.distributed.all_reduce(sums)
        position = Position(
            position.epoch, position.step_in_epoch, position.global_step, sums / run.info.world_size
        )

    def write() -> None:
        if before is not None:
            before()
        save_checkpoint(checkpoint_state(run, position), run.latest_path)
    distributed.on_main_rank(write, run.info.is_main, run.device)


def check_finite(run: Run, losses: torch.Tensor, epoch: int, first: int, done: int) -> None:
    """Steps first..done-1 of the epoch's loss buffer; ranks agree, so a NaN on one rank stops all
    of them."""
    bad = ~torch.isfinite(losses[first:done]).all(dim=1)
    local_bad = bool(bad.any())
    if distributed.any_rank(local_bad, run.device):
        where = (
            f"global step {epoch * run.steps_per_epoch + first + int(bad.int().argmax())}"
            if local_bad
            else "on another rank"
        )
        raise NonFiniteLoss(f"non-finite loss at {where}")


def check_finite_weights(run: Run, global_step: int) -> None:
    """A finite loss can still be followed by an update to inf/NaN weights: never write those to
    disk."""
    params = [p.detach() for p in run.trainable.parameters()]
    if not torch.isfinite(torch.stack([p.float().abs().amax() for p in params])).all():
        raise NonFiniteLoss(f"non-finite weights after global step {global_step}")


def stop_exit(run: Run, stop: StopSignal, where: str) -> int:
    """After the save a stop signal asked for: Ctrl-C exits 130, SIGUSR1/SIGTERM 75 (the sbatch
    script requeues)."""
    if stop.interrupted:
        print(
            f"interrupted (Ctrl-C): saved {run.latest_path} {where}; rerun the same command to"
            " resume",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    print(
        f"stop requested: saved {run.latest_path} {where}; exiting with {EXIT_REQUEUE} for requeue",
        flush=True,
    )
    return EXIT_REQUEUE


# ------------------------------------------------------ end of epoch: diagnostics, log, checkpoints
def end_epoch(run: Run, epoch: int, result: EpochResult) -> None:
    """Logs the epoch (rank 0), writes checkpoint_latest and, if asked for, checkpoint_epoch_{N}."""
    completed, global_step = epoch + 1, (epoch + 1) * run.steps_per_epoch
    totals = result.sums.clone()
    if run.info.enabled:
        torch.distributed.all_reduce(totals)
        totals /= run.info.world_size
    means = (totals[:-1] / totals[-1]).tolist()
    diagnostics = epoch_diagnostics(run) if run.info.is_main else {}
    names = ["loss", *(f"loss_{n}" for n in run.trainable.loss.term_names)]
    record = {
        "epoch": completed,
        "global_step": global_step,
        **dict(zip(names, means)),
        "lr": run.schedule[global_step - 1],
        "img_per_s": result.seen / max(result.seconds, 1e-9),
        "seconds": result.seconds,
        **diagnostics,
    }
    position = Position(completed, 0, global_step)

    def epoch_outputs() -> None:
        # Epoch file and log line before checkpoint_latest: a kill in between resumes before this
        # epoch and writes both again, instead of resuming past an epoch whose
        # checkpoint_epoch_N.pth was never written.
        if completed in run.cfg.train.save_epochs:
            path = os.path.join(run.cfg.train.checkpoint_dir, f"checkpoint_epoch_{completed}.pth")
            save_checkpoint(checkpoint_state(run, position), path)
        log_record(run.cfg, record, run.loggers)
    save_latest(run, position, before=epoch_outputs)


@torch.no_grad()
def epoch_diagnostics(run: Run) -> Dict[str, Optional[float]]:
    """Collapse diagnostics on the fixed held-out batch, without augmentation."""
    bare, images, cfg = run.trainable, run.data.diag_images, run.cfg
    bare.eval()
    x, teacher_x = model_inputs(
        images,
        identity_params(len(images), run.device),
        cfg.model.student_img_size,
        cfg.model.teacher_img_size if run.teacher is not None else None,
    )
    with autocast(run.device, run.amp):
        s_cls, s_patch = student_tokens(bare.student, x)
        t_cls = run.teacher(teacher_x)[0] if run.teacher is not None else None
    bare.train()
    feature = pooled_feature(s_cls, s_patch, cfg.model.use_cls_token).float()
    out = {"student_pairwise_cos": metrics.mean_pairwise_cosine(feature),
           "student_feature_std": metrics.feature_std(feature),
           "teacher_pairwise_cos": None, "student_teacher_cos": None}
    if t_cls is not None:
        out["teacher_pairwise_cos"] = metrics.mean_pairwise_cosine(t_cls.float())
        out["student_teacher_cos"] = bare.criterion.cls_cosine(s_cls, t_cls)
    return out


def log_record(cfg: Config, record: Dict[str, Any], loggers: Optional[Loggers] = None) -> None:
    """Adds a line to log.jsonl. The file is rewritten whole through atomic_write (it is small): on
    a full disk it stays as it was, and the run ends with one line (WriteError) instead of a cut or
    emptied log."""
    path = os.path.join(cfg.train.checkpoint_dir, "log.jsonl")
    before = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            before = f.read()
    line = json.dumps(record)
    atomic_write(path, lambda f: f.write(before + line.encode() + b"\n"))
    print(line, flush=True)
    if loggers:
        loggers.record(record)


def trim_log(checkpoint_dir: str, completed_epochs: int) -> None:
    """Drops log lines for epochs past the checkpoint we resume from (they will be run again)."""
    path = os.path.join(checkpoint_dir, "log.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if _logged_epoch(line) <= completed_epochs]
    # a kill here must not empty the log
    atomic_write(path, lambda f: f.write("".join(lines).encode()))


def _logged_epoch(line: str) -> float:
    """Epoch of a log line (of an event line such as "resumed": the epochs completed when it was
    written); a line cut short by a kill counts as past every epoch, so trim_log drops it."""
    try:
        record = json.loads(line)
        return record["epoch"] if "epoch" in record else record["after_epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class StopSignal(distributed.HandledSignals):
    """SIGUSR1 (SLURM's pre-timeout signal), SIGTERM (preemption) and SIGINT (Ctrl-C) ask for a save
    and exit at the next step; a second Ctrl-C raises KeyboardInterrupt at once (main: one line,
    exit 130).

    Installed for the whole of train(), set-up included, and the previous handlers restored after,
    so in-process callers (run_experiments.py) get their own handling back between runs.
    """
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.interrupted = False  # by Ctrl-C: exit 130 as a shell expects, not the requeue code

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
        self.requested = True


if __name__ == "__main__":
    sys.exit(main())
