"""Throughput of feature distillation, in images per second, on one device; prints ONE JSON line.

    python bench.py                                   # default configs: DINOv2 ViT-B/14 @224 -> ViT-S/16 @96, CIFAR-10
    python bench.py --override data.dataset_name=imagefolder data.dataset_root=/tmp/cifar10-jpeg
    python bench.py --compile --output bench.json     # train.compile: true; also writes the JSON to bench.json
    python bench.py --smoke                           # tiny models, synthetic images, CPU, a few seconds (CI)

Measured in one process, same models and batch size throughout (random-init teacher unless
--override model.teacher_pretrained=true: speed does not depend on the weights). The step runs in the mode the
trainer would use (`step_mode`: captured = one CUDA graph per step, train.cuda_graphs auto on one GPU; eager on CPU):
  (a) reference_img_per_s        the legacy pipeline: torchvision dataset, per-image PIL RandomResizedCrop + flip +
                                 blur, DataLoader with 2 workers, batch to the device, teacher input = the student
                                 view resized to teacher_img_size, live teacher, bf16 autocast on CUDA, eager step
  (b) train_step_img_per_s       the trainer (build_run, make_train_step, train_one_epoch) on the last --steps steps
                                 of an epoch: uint8 data on the device, batched augmentation there, live teacher
  (c) teacher_forward_img_per_s  the teacher forward alone on device-resident inputs, in the mode of (b)
  (d) cached_train_step_img_per_s  (b) with train.cache_teacher_features: true (teacher_cache.py); the cache is
                                 built for only the images the timed steps use (build rate reported separately)
  *_eager_img_per_s              (b), (c), (d) with the plain eager step, when (b) is captured
  captured_vs_eager              losses and weights after 5 identical steps from one state, eager vs captured
  epoch_s, epoch_end_s           one whole trainer epoch (train_one_epoch on all the data), then end_epoch
                                 (diagnostics, log line, checkpoint_latest.pth written)
  run50_min_est_live / _cached   50 x (epoch + end of epoch); cached: the full cache build, then epochs at (d)'s rate
                                 plus the live epoch's overhead beyond its steps (an estimate: see README "Speed")
Each rate runs --warmup iterations, then --steps timed ones between torch.cuda.synchronize() calls. (b) and (d) time
train_one_epoch calls, so per-epoch set-up (view sampling, cached-target gather) is in epoch_s, not in them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

import distill_trainer
from checkpoint import run_metadata
from config import (DEFAULT_FILES, ArgumentParser, Config, UserError, apply_overrides, dotted, load_config,
                    one_line_warnings, replace_values)
from distill_trainer import Position, Run
from distributed import DistInfo
from models import autocast
from optimizer import set_lr
from train_step import CapturedStep, Step, capture, eager_step, make_train_step, restore, snapshot
from transforms import IMAGENET_MEAN, IMAGENET_STD, model_inputs, sample_view_params

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_WORKERS = 2  # the legacy DataLoader
REFERENCE_BLUR_PROB = 0.5  # the legacy optional Gaussian blur, switched on as in DINO's global views
SMOKE_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
SMOKE_CLASSES, SMOKE_TRAIN_PER_CLASS, SMOKE_TEST_PER_CLASS = 4, 12, 2
DEFAULTS = {"batch_size": 64, "steps": 50, "warmup": 10}
SMOKE_DEFAULTS = {"batch_size": 8, "steps": 4, "warmup": 2}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_config", default=os.path.join(HERE, DEFAULT_FILES["data"]))
    p.add_argument("--train_config", default=os.path.join(HERE, DEFAULT_FILES["train"]))
    p.add_argument("--model_config", default=os.path.join(HERE, DEFAULT_FILES["model"]))
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--batch_size", type=int, help="per step (default 64; --smoke 8)")
    p.add_argument("--steps", type=int, help="timed iterations per part (default 50; --smoke 4)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 10; --smoke 2)")
    p.add_argument("--compile", action="store_true", help="train.compile: true (student step and teacher forward)")
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU and synthetic images, in seconds")
    p.add_argument("--output", help="also write the JSON line to this file")
    args = p.parse_args(argv)
    for name, value in (SMOKE_DEFAULTS if args.smoke else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be {'>= 0' if name == 'warmup' else '>= 1'}")
    return args


# ----------------------------------------------------------------- config
def make_smoke_data(root: str) -> None:
    """A tiny image folder (random 32 px PNGs): enough for the smoke run's few steps."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", SMOKE_TRAIN_PER_CLASS), ("test", SMOKE_TEST_PER_CLASS)):
        for label in range(SMOKE_CLASSES):
            folder = os.path.join(root, split, f"class{label}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"{folder}/{i:03d}.png")


def smoke_overrides(root: str) -> Dict[str, Any]:
    return {"data.dataset_name": "imagefolder", "data.dataset_root": root, "data.image_size": 24,
            "data.num_workers": 0, "data.download": False, "model.teacher_name": "vit_small_patch14_dinov2",
            "model.teacher_img_size": 32, "model.teacher_kwargs": SMOKE_VIT, "model.student_img_size": 24,
            "model.student_kwargs": SMOKE_VIT, "train.device": "cpu", "train.diag_batch_size": 8,
            "train.teacher_cache_views": 2}


def bench_config(args: argparse.Namespace, work_dir: str, **forced: Any) -> Config:
    """The user's configs and overrides plus what the benchmark needs: a random teacher unless asked otherwise,
    three epochs at a constant lr (no warmup, min_lr = lr) in a temporary run directory."""
    cfg = load_config(args.data_config, args.train_config, args.model_config)
    pre: Dict[str, Any] = {"model.teacher_pretrained": False}
    if args.smoke:
        pre.update(smoke_overrides(os.path.join(work_dir, "smoke_data")))
    cfg = apply_overrides(replace_values(cfg, dotted(pre), "bench.py"), args.override)
    post = {"train.batch_size": args.batch_size, "train.objective": "distill", "train.compile": args.compile,
            "train.checkpoint_dir": os.path.join(work_dir, "run"), "train.progress": False,
            "train.cache_teacher_features": False, "train.max_steps_per_epoch": None, "train.num_epochs": 3,
            "train.stop_after_epoch": None, "train.save_epochs": [1], "train.warmup_epochs": 0,
            "train.min_lr": cfg.train.learning_rate, **forced}
    return replace_values(cfg, dotted(post), "bench.py")


def make_run(cfg: Config) -> Run:
    device = distill_trainer.resolve_device(cfg.train.device, 0)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
        return distill_trainer.build_run(cfg, DistInfo(), device)


# ----------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(step: Callable[[], int], warmup: int, steps: int, device: torch.device) -> float:
    """`step()` runs one iteration and returns its image count; warmup untimed, then `steps` timed."""
    for _ in range(warmup):
        step()
    sync(device)
    started, seen = time.perf_counter(), 0
    for _ in range(steps):
        seen += step()
    sync(device)
    return seen / (time.perf_counter() - started)


def trainer_images_per_s(run: Run, step: Step, steps: int, warmup: int) -> float:
    """train_one_epoch as the trainer calls it, on the last `steps` steps of epoch 1 after the last `warmup` steps
    of epoch 0 (which also start the teacher cache's prefetch of epoch 1, as a previous epoch would)."""
    n = run.steps_per_epoch
    steps, warmup = min(steps, n), min(warmup, n)
    with contextlib.redirect_stdout(sys.stderr):
        if warmup:
            distill_trainer.train_one_epoch(run, step, Position(0, n - warmup, n - warmup))
        sync(run.device)
        started = time.perf_counter()
        result = distill_trainer.train_one_epoch(run, step, Position(1, n - steps, 2 * n - steps))
        sync(run.device)
    return result.seen / (time.perf_counter() - started)


def epoch_seconds(run: Run, step: Step) -> Dict[str, float]:
    """A whole trainer epoch (its set-up included), then the end of epoch: diagnostics, log line, checkpoint."""
    n = run.steps_per_epoch
    os.makedirs(run.cfg.train.checkpoint_dir, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):
        sync(run.device)
        started = time.perf_counter()
        result = distill_trainer.train_one_epoch(run, step, Position(2, 0, 2 * n))
        sync(run.device)
        ended = time.perf_counter()
        distill_trainer.end_epoch(run, 2, result)
        sync(run.device)
    return {"epoch_s": ended - started, "epoch_end_s": time.perf_counter() - ended,
            "epoch_img_per_s": result.seen / (ended - started), "steps_per_epoch": n}


def count_syncs(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Host-device synchronisations inside fn (CUDA's sync debug mode); None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def one_step(run: Run, step: Step) -> Callable[[], Any]:
    indices, params, targets = distill_trainer.epoch_batches(run, 1)
    return lambda: step(indices[0], params[0], 0, None if targets is None else targets[0])


def captured_vs_eager(run: Run, captured: Step, eager: Step, steps: int = 5) -> Dict[str, float]:
    """The same `steps` batches from the same state through both steps; differences next to their scales."""
    indices, params, targets = distill_trainer.epoch_batches(run, 0)
    start = snapshot(run)
    outcomes = []
    for step in (eager, captured):
        losses = torch.stack([step(indices[i], params[i], i, None if targets is None else targets[i])
                              for i in range(steps)])
        outcomes.append((losses, [p.detach().clone() for p in run.trainable.parameters()]))
        restore(run, start)
    (loss_e, w_e), (loss_c, w_c) = outcomes
    return {"steps": steps, "max_loss_abs_diff": float((loss_e - loss_c).abs().max()),
            "loss_scale": float(loss_e.abs().max()),
            "max_weight_abs_diff": max(float((a - b).abs().max()) for a, b in zip(w_e, w_c)),
            "max_weight_update": max(float((a - b).abs().max()) for a, b in zip(w_e, start["params"]))}


# ----------------------------------------------------------------- parts
def teacher_images_per_s(run: Run, warmup: int, steps: int, captured: bool) -> float:
    """The teacher forward on a fixed device batch: eager (or compiled), or replayed from a CUDA graph."""
    images = run.data.train_images[:run.cfg.train.batch_size]
    params = sample_view_params(len(images), torch.Generator().manual_seed(0))
    _, teacher_x = model_inputs(images, params, run.cfg.model.student_img_size, run.cfg.model.teacher_img_size)
    teacher = torch.compile(run.teacher) if run.cfg.train.compile else run.teacher

    def forward() -> None:
        with autocast(run.device, run.amp, cache_enabled=not captured):
            teacher(teacher_x)
    if captured:
        forward = capture(forward, run.device)[0].replay
    return images_per_s(lambda: forward() or len(teacher_x), warmup, steps, run.device)


def reference_loader(cfg: Config, batch_size: int):
    """The legacy input pipeline: a torchvision dataset with per-image PIL transforms and 2 loader workers."""
    import torchvision
    import torchvision.transforms as T
    from data_loader import stratified_subset
    tf = T.Compose([T.RandomResizedCrop(cfg.data.image_size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                    T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=REFERENCE_BLUR_PROB), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    d = cfg.data
    root = os.path.expanduser(d.dataset_root)
    if d.dataset_name == "imagefolder":
        dataset = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=tf)
    else:
        cls = torchvision.datasets.CIFAR10 if d.dataset_name == "cifar10" else torchvision.datasets.CIFAR100
        dataset = cls(root, train=True, download=False, transform=tf)
    if d.max_samples is not None and d.max_samples < len(dataset):
        dataset = torch.utils.data.Subset(dataset, stratified_subset(torch.tensor(dataset.targets), d.max_samples))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=REFERENCE_WORKERS)


def reference_images_per_s(run: Run, warmup: int, steps: int) -> float:
    cfg, device = run.cfg, run.device
    loader = reference_loader(cfg, cfg.train.batch_size)

    def batches():
        while True:  # a new pass (and new workers) only when the data is shorter than warmup + steps
            yield from loader
    source = batches()

    def step() -> int:
        x = next(source)[0].to(device)
        teacher_x = F.interpolate(x, size=cfg.model.teacher_img_size, mode="bicubic", align_corners=False)
        set_lr(run.optimizer, cfg.train.learning_rate)
        with autocast(device, run.amp):
            t_cls, t_patch = run.teacher(teacher_x)
            loss = run.trainable(x, t_cls, t_patch, None)[0]
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        return len(x)
    return images_per_s(step, warmup, steps, device)


def fused_attn(model: torch.nn.Module) -> Optional[bool]:
    blocks = getattr(model, "blocks", None)
    return bool(getattr(blocks[0].attn, "fused_attn", False)) if blocks is not None and len(blocks) else None


# ----------------------------------------------------------------- main
def measure_live(args: argparse.Namespace, work_dir: str, out: Dict[str, Any]) -> None:
    """(c), (b), the eager variants and their comparison, a whole epoch, (a) — all on one run."""
    cfg = bench_config(args, work_dir)
    run = make_run(cfg)
    step = make_train_step(run)
    captured = isinstance(step, CapturedStep)
    out.update(device=str(run.device), autocast=str(run.amp).replace("torch.", "") if run.amp else None,
               step_mode=("captured" if captured else "eager") + (" + compiled" if cfg.train.compile else ""),
               steps=min(args.steps, run.steps_per_epoch), warmup=min(args.warmup, run.steps_per_epoch),
               student=cfg.model.student_name, teacher=cfg.model.teacher_name,
               student_img_size=cfg.model.student_img_size, teacher_img_size=cfg.model.teacher_img_size,
               num_train_images=len(run.data.train_images),
               fused_attn={"student": fused_attn(run.trainable.student), "teacher": fused_attn(run.teacher.backbone)})
    parts = [("teacher_forward", lambda: teacher_images_per_s(run, args.warmup, args.steps, captured)),
             ("train_step", lambda: trainer_images_per_s(run, step, args.steps, args.warmup))]
    if captured:
        eager = eager_step(run, run.trainable, run.teacher)
        parts += [("teacher_forward_eager", lambda: teacher_images_per_s(run, args.warmup, args.steps, False)),
                  ("train_step_eager", lambda: trainer_images_per_s(run, eager, args.steps, args.warmup))]
        out["captured_vs_eager"] = captured_vs_eager(run, step, eager)
    parts.append(("reference", lambda: reference_images_per_s(run, args.warmup, args.steps)))
    for name, measure in parts:
        out[f"{name}_img_per_s"] = measure()
        out["peak_gpu_mem_gib_by_part"][name] = peak_memory(run.device)
    out["host_syncs_per_step"]["train_step"] = count_syncs(one_step(run, step), run.device)
    out.update(epoch_seconds(run, step))


def measure_cached(args: argparse.Namespace, work_dir: str, out: Dict[str, Any]) -> None:
    """(d): the cache covers only the images the timed steps use; its build rate gives the full build time."""
    full_images, needed = out["num_train_images"], out["steps"] * args.batch_size
    cfg = bench_config(args, work_dir, **{"train.cache_teacher_features": True,
                                          "data.max_samples": needed if needed < full_images else None})
    run = make_run(cfg)
    out["peak_gpu_mem_gib_by_part"]["cache_build"] = peak_memory(run.device)  # teacher batches of BUILD_BATCH
    cache = run.teacher_cache
    with open(os.path.join(cache.directory, "meta.json")) as f:
        build_seconds = json.load(f)["build_seconds"]
    views_per_s = cache.num_images * cache.num_views / max(build_seconds, 1e-9)
    step = make_train_step(run)
    out["cached_train_step_img_per_s"] = trainer_images_per_s(run, step, args.steps, args.warmup)
    out["peak_gpu_mem_gib_by_part"]["cached_train_step"] = peak_memory(run.device)
    if isinstance(step, CapturedStep):
        eager = eager_step(run, run.trainable, run.teacher)
        out["cached_train_step_eager_img_per_s"] = trainer_images_per_s(run, eager, args.steps, args.warmup)
    out["host_syncs_per_step"]["cached_train_step"] = count_syncs(one_step(run, step), run.device)
    full_bytes = full_images * cache.num_views * cache.num_tokens * cache.dim * 2
    out.update(cache_views=cache.num_views, cache_build_views_per_s=views_per_s,
               cache_full_gb=full_bytes / 1e9, cache_full_build_s_est=full_images * cache.num_views / views_per_s)


def run50_estimates(out: Dict[str, Any]) -> Dict[str, float]:
    """Minutes for the default 50 epochs: measured epochs (live); the cache build plus epochs at (d)'s step rate
    and the live epoch's overhead beyond its steps (cached). Start-up (data, teacher) is not included."""
    images = out["steps_per_epoch"] * out["batch_size"]
    overhead = max(0.0, out["epoch_s"] - images / out["train_step_img_per_s"])
    cached_epoch = images / out["cached_train_step_img_per_s"] + overhead
    return {"epoch_over_b": out["epoch_img_per_s"] / out["train_step_img_per_s"],
            "run50_min_est_live": 50 * (out["epoch_s"] + out["epoch_end_s"]) / 60,
            "run50_min_est_cached": (out["cache_full_build_s_est"] + 50 * (cached_epoch + out["epoch_end_s"])) / 60}


def peak_memory(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    out: Dict[str, Any] = {"bench": "kd_throughput", "smoke": args.smoke, "batch_size": args.batch_size,
                           "compile": args.compile, "peak_gpu_mem_gib_by_part": {}, "host_syncs_per_step": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kd_bench_") as work_dir:
        if args.smoke:
            make_smoke_data(os.path.join(work_dir, "smoke_data"))
        measure_live(args, work_dir, out)
        measure_cached(args, work_dir, out)
    b = out["train_step_img_per_s"]
    peaks = [v for v in out["peak_gpu_mem_gib_by_part"].values() if v is not None]
    out.update(ratio_b_over_a=b / out["reference_img_per_s"], ratio_b_over_c=b / out["teacher_forward_img_per_s"],
               ratio_d_over_b=out["cached_train_step_img_per_s"] / b, **run50_estimates(out),
               peak_gpu_mem_gib=max(peaks) if peaks else None, seconds=time.perf_counter() - started,
               cuda=torch.version.cuda, **run_metadata())
    return out


@one_line_warnings()
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.smoke:  # tiny models gain nothing from intra-op threads, and spin-waiting ones crawl on a busy CI box
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(xFormers|RANDOMLY INITIALISED).*")
    try:
        result = benchmark(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = json.dumps(result, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v))
    print(line, flush=True)
    if args.output:
        with open(args.output, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
