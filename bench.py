"""Throughput of feature distillation, in images per second, on one device; prints ONE JSON line.

    python bench.py                          # default configs: DINOv2 ViT-B/14 @224 -> ViT-S/16 @96
    python bench.py --override data.dataset_name=imagefolder data.dataset_root=/tmp/cifar10-jpeg
    python bench.py --compile --output bench.json   # train.compile: true; JSON also to a file
    python bench.py --parts parts.jsonl --profile prof.txt   # parts as measured; top-kernel table
    python bench.py --smoke                  # tiny models, synthetic images, CPU, seconds (CI)

Measured in one process, same models and batch size throughout (random-init teacher unless
--override model.teacher_pretrained=true: speed does not depend on the weights). The step runs in
the mode the trainer would use (`step_mode`, `step_mode_reason`, `capture_error`, as in the
trainer's first log record):
  (a) reference_img_per_s     the legacy pipeline: torchvision dataset, per-image PIL
                              RandomResizedCrop + flip + blur, DataLoader with 2 workers, batch to
                              the device, teacher input = the student view resized to
                              teacher_img_size, live teacher, eager step
  (b) train_step_img_per_s    the trainer's step (build_run, make_train_step) on --steps batches of
                              an epoch: uint8 data on the device, batched augmentation, live teacher
  (c) teacher_forward_img_per_s  the teacher forward alone on device-resident inputs, mode of (b)
  (d) cached_train_step_img_per_s  (b) with train.cache_teacher_features: true; the cache is built
                              for only the images the timed steps use (build rate reported apart)
  *_eager_img_per_s           (b), (c), (d) uncaptured on the same (compiled) modules, if captured
  captured_check, cached_captured_check  train_step.check_equivalence: captured vs eager vs eager
                              again on a rising lr, and the lr = 0 replay; `captured_ok` is true
                              only if every check passed
  host_syncs_per_step         host-device syncs of one step (torch.cuda.set_sync_debug_mode), for
                              the step as run and its uncaptured twin
  epoch_s, epoch_end_s        one whole trainer epoch (train_one_epoch on all the data, set-up
                              included), then end_epoch (diagnostics, log line, checkpoint)
  run50_min_est_live/_cached  50 x (epoch + end of epoch); cached: the full cache build, then
                              epochs at (d)'s rate plus the live epoch's overhead beyond its steps
Timing windows time the steps only: the epoch's batches (view sampling, cached-target gather) are
prepared and max(1, --warmup) untimed steps run first (the first replay or compiled call is set-up),
then --steps timed steps between torch.cuda.synchronize() calls; each step's losses go to a device
buffer row, as in train_one_epoch. Per-epoch set-up is in epoch_s (epoch_over_b = epoch rate / (b)).
Paths given with --output, --parts and --profile are checked before anything is measured.
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
from checkpoint import check_output_file, run_metadata
from config import (
    DEFAULT_FILES, ArgumentParser, Config, UserError, apply_overrides, dotted, load_config,
    one_line_warnings, replace_values,
)
from distill_trainer import Position
from distributed import DistInfo
from models import autocast
from optimizer import set_lr
from train_step import (EQUIVALENCE_STEPS, CapturedStep, EagerStep, Run, Step, StepMode, TrainStep,
                        capture, check_equivalence, make_train_step)
from transforms import IMAGENET_MEAN, IMAGENET_STD, model_inputs, sample_view_params

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_WORKERS = 2  # the legacy DataLoader
# the legacy optional Gaussian blur, switched on as in DINO's global views
REFERENCE_BLUR_PROB = 0.5
SMOKE_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
SMOKE_CLASSES, SMOKE_TRAIN_PER_CLASS, SMOKE_TEST_PER_CLASS = 4, 12, 2
DEFAULTS = {"batch_size": 64, "steps": 50, "warmup": 10}
SMOKE_DEFAULTS = {"batch_size": 8, "steps": 4, "warmup": 2}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--data_config", default=os.path.join(HERE, DEFAULT_FILES["data"]))
    p.add_argument("--train_config", default=os.path.join(HERE, DEFAULT_FILES["train"]))
    p.add_argument("--model_config", default=os.path.join(HERE, DEFAULT_FILES["model"]))
    p.add_override()
    p.add_argument("--batch_size", type=int, help="per step (default 64; --smoke 8)")
    p.add_argument("--steps", type=int, help="timed iterations per part (default 50; --smoke 4)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 10; --smoke 2)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="train.compile: true (student step and teacher forward)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny models on CPU and synthetic images, in seconds"
    )
    p.add_argument("--no_cached", action="store_true", help="leave out (d), the cached-target step")
    p.add_argument("--output", help="also write the JSON line to this file")
    p.add_argument("--parts", help="append each part's figures here as a JSON line when measured")
    p.add_argument("--profile", help="append torch.profiler tables of the top kernels here")
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
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    f"{folder}/{i:03d}.png"
                )


def smoke_overrides(root: str) -> Dict[str, Any]:
    return {
        "data.dataset_name": "imagefolder",
        "data.dataset_root": root,
        "data.image_size": 24,
        "data.num_workers": 0,
        "data.download": False,
        "model.teacher_name": "vit_small_patch14_dinov2",
        "model.teacher_img_size": 32,
        "model.teacher_kwargs": SMOKE_VIT,
        "model.student_img_size": 24,
        "model.student_kwargs": SMOKE_VIT,
        "train.device": "cpu",
        "train.diag_batch_size": 8,
        "train.teacher_cache_views": 2,
    }


def bench_config(args: argparse.Namespace, work_dir: str, **forced: Any) -> Config:
    """The user's configs and overrides plus what the benchmark needs: a random teacher unless asked
    otherwise, three epochs at a constant lr (no warmup, min_lr = lr) in a temporary run
    directory."""
    cfg = load_config(args.data_config, args.train_config, args.model_config)
    pre: Dict[str, Any] = {"model.teacher_pretrained": False}
    if args.smoke:
        pre.update(smoke_overrides(os.path.join(work_dir, "smoke_data")))
    cfg = apply_overrides(replace_values(cfg, dotted(pre), "bench.py"), args.override)
    post = {
        "train.batch_size": args.batch_size,
        "train.objective": "distill",
        "train.compile": args.compile,
        "train.checkpoint_dir": os.path.join(work_dir, "run"),
        "train.progress": False,
        "train.cache_teacher_features": False,
        "train.max_steps_per_epoch": None,
        "train.num_epochs": 3,
        "train.stop_after_epoch": None,
        "train.save_epochs": [1],
        "train.warmup_epochs": 0,
        "train.min_lr": cfg.train.learning_rate,
        **forced,
    }
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
    """`step()` runs one iteration and returns its image count; warmup untimed, then `steps`
    timed."""
    for _ in range(warmup):
        step()
    sync(device)
    started, seen = time.perf_counter(), 0
    for _ in range(steps):
        seen += step()
    sync(device)
    return seen / (time.perf_counter() - started)


def check_and_time(parts, run: Run, step: TrainStep, captured: bool, args, prefix: str) -> Step:
    """The equivalence check of a captured step, then its img/s, as parts PREFIXcaptured_check and
    PREFIXtrain_step; returns the uncaptured twin (the step itself when not captured)."""
    eager = uncaptured(step) if captured else step
    if captured:
        check = check_equivalence(run, step, eager, distill_trainer.epoch_batches(run, 0))
        parts.add(f"{prefix}captured_check", run.device, **{f"{prefix}captured_check": check})
    rate = steps_images_per_s(run, step, args.steps, args.warmup)
    parts.add(f"{prefix}train_step", run.device, **{f"{prefix}train_step_img_per_s": rate})
    return eager


def steps_images_per_s(run: Run, step: TrainStep, steps: int, warmup: int) -> float:
    """The steps alone (see the module docstring): batches of epoch 1 prepared first, max(1, warmup)
    untimed steps, then `steps` timed ones, each writing its losses to a device buffer row as
    train_one_epoch does."""
    n = run.steps_per_epoch
    indices, params, targets = distill_trainer.epoch_batches(run, 1)
    losses = torch.zeros(n, 1 + len(run.trainable.loss.term_names), device=run.device)

    def one(i: int) -> int:
        i %= n
        losses[i] = step(indices[i], params[i], n + i, None if targets is None else targets[i])
        return len(indices[i])
    warmup = max(1, warmup)
    for i in range(warmup):
        one(i)
    sync(run.device)
    started = time.perf_counter()
    seen = sum(one(warmup + i) for i in range(min(steps, n)))
    sync(run.device)
    return seen / (time.perf_counter() - started)


def epoch_seconds(run: Run, step: Step) -> Dict[str, float]:
    """A whole trainer epoch (its set-up included), then the end of epoch: diagnostics, log line,
    checkpoint."""
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


def profile_table(run: Run, step: Step, title: str, rows: int = 15) -> str:
    """torch.profiler's top kernels of 3 steps (on CPU: top ops), as text headed by `title`."""
    from torch.profiler import ProfilerActivity, profile
    cuda = run.device.type == "cuda"
    run_step = one_step(run, step)
    run_step()
    sync(run.device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            run_step()
        sync(run.device)
    order = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=order, row_limit=rows, max_name_column_width=60)
    return f"== {title}: top {rows} of 3 steps\n{table}\n"


# ----------------------------------------------------------------- parts
def teacher_images_per_s(run: Run, teacher: torch.nn.Module, warmup: int, steps: int,
                         captured: bool) -> float:
    """The teacher forward (the step's module: compiled when it is) on a fixed device batch: as
    is, or replayed from a CUDA graph."""
    images = run.data.train_images[:run.cfg.train.batch_size]
    params = sample_view_params(len(images), torch.Generator().manual_seed(0))
    _, teacher_x = model_inputs(
        images, params, run.cfg.model.student_img_size, run.cfg.model.teacher_img_size
    )

    def forward() -> None:
        with autocast(run.device, run.amp, cache_enabled=not captured):
            teacher(teacher_x)
    if captured:
        forward = capture(forward, run.device)[0].replay
    return images_per_s(lambda: forward() or len(teacher_x), warmup, steps, run.device)


def reference_loader(cfg: Config, batch_size: int):
    """The legacy input pipeline: a torchvision dataset with per-image PIL transforms and 2 loader
    workers."""
    import torchvision
    import torchvision.transforms as T
    from data_loader import stratified_subset
    tf = T.Compose([
        T.RandomResizedCrop(cfg.data.image_size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=REFERENCE_BLUR_PROB),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    d = cfg.data
    root = os.path.expanduser(d.dataset_root)
    if d.dataset_name == "imagefolder":
        dataset = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=tf)
    else:
        cls = (
            torchvision.datasets.CIFAR10
            if d.dataset_name == "cifar10"
            else torchvision.datasets.CIFAR100
        )
        dataset = cls(root, train=True, download=False, transform=tf)
    if d.max_samples is not None and d.max_samples < len(dataset):
        dataset = torch.utils.data.Subset(
            dataset, stratified_subset(torch.tensor(dataset.targets), d.max_samples)
        )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=REFERENCE_WORKERS)


def reference_images_per_s(run: Run, warmup: int, steps: int) -> float:
    cfg, device = run.cfg, run.device
    loader = reference_loader(cfg, cfg.train.batch_size)

    def batches():
        # a new pass (and new workers) only when the data is shorter than warmup + steps
        while True:
            yield from loader
    source = batches()

    def step() -> int:
        x = next(source)[0].to(device)
        teacher_x = F.interpolate(
            x, size=cfg.model.teacher_img_size, mode="bicubic", align_corners=False
        )
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
    return (
        bool(getattr(blocks[0].attn, "fused_attn", False))
        if blocks is not None and len(blocks)
        else None
    )


# ----------------------------------------------------------------- main
class Parts:
    """The result, filled part by part; with --parts each part's figures are also appended to that
    file as one JSON line the moment they are measured: a bench killed by a timeout keeps them."""

    def __init__(self, args: argparse.Namespace):
        self.out: Dict[str, Any] = {"bench": "kd_throughput", "smoke": args.smoke,
                                    "batch_size": args.batch_size, "compile": args.compile,
                                    "peak_gpu_mem_gib_by_part": {}, "host_syncs_per_step": {}}
        self.path, self.profile_path = args.parts, args.profile
        self.started = time.perf_counter()

    def add(self, part: str, on: Optional[torch.device] = None, **figures: Any) -> None:
        """Records `figures`; `on`: the device whose peak memory since the last part goes along."""
        self.out.update(figures)
        line = {"part": part, "compile": self.out["compile"],
                "step_mode": self.out.get("step_mode"), **figures}
        if on is not None:
            self.out["peak_gpu_mem_gib_by_part"][part] = line["peak_gpu_mem_gib"] = peak_memory(on)
        line["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        if self.path:
            with open(self.path, "a") as f:
                f.write(to_json(line) + "\n")
        print(f"bench: {part} done at {line['elapsed_s']} s", file=sys.stderr, flush=True)

    def syncs(self, name: str, count: Optional[int]) -> None:
        self.out["host_syncs_per_step"][name] = count
        self.add(f"host_syncs_{name}", **{f"host_syncs_{name}": count})
        self.out.pop(f"host_syncs_{name}")

    def profile(self, text: str) -> None:
        if self.profile_path:
            with open(self.profile_path, "a") as f:
                f.write(text)


def uncaptured(step: TrainStep) -> TrainStep:
    """The same modules (compiled when the step's are), op by op: what a capture must match."""
    name = "compiled" if step.mode.name.endswith("compiled") else "eager"
    mode = StepMode(name, "bench.py: the step without its graph")
    return EagerStep(step.run, step.model, step.teacher, mode)


def measure_live(args: argparse.Namespace, work_dir: str, parts: Parts) -> None:
    """The captured step's check, (b), (c), their eager variants, host syncs, an epoch, (a)."""
    cfg = bench_config(args, work_dir)
    run = make_run(cfg)
    step = make_train_step(run)
    captured = isinstance(step, CapturedStep)
    parts.add("setup", run.device, device=str(run.device), **step.mode.record(),
              autocast=str(run.amp).replace("torch.", "") if run.amp else None,
              steps=min(args.steps, run.steps_per_epoch), warmup=max(1, args.warmup),
              student=cfg.model.student_name, teacher=cfg.model.teacher_name,
              student_img_size=cfg.model.student_img_size,
              teacher_img_size=cfg.model.teacher_img_size,
              num_train_images=len(run.data.train_images), steps_per_epoch=run.steps_per_epoch,
              fused_attn={"student": fused_attn(run.trainable.student),
                          "teacher": fused_attn(run.teacher.backbone)})
    eager = check_and_time(parts, run, step, captured, args, "")
    rate = teacher_images_per_s(run, step.teacher, args.warmup, args.steps, captured)
    parts.add("teacher_forward", run.device, teacher_forward_img_per_s=rate)
    if captured:
        rate = steps_images_per_s(run, eager, args.steps, args.warmup)
        parts.add("train_step_eager", run.device, train_step_eager_img_per_s=rate)
        rate = teacher_images_per_s(run, step.teacher, args.warmup, args.steps, False)
        parts.add("teacher_forward_eager", run.device, teacher_forward_eager_img_per_s=rate)
    parts.syncs("train_step", count_syncs(one_step(run, step), run.device))
    if captured:
        parts.syncs("train_step_eager", count_syncs(one_step(run, eager), run.device))
    parts.add("epoch", run.device, **epoch_seconds(run, step))
    parts.profile(profile_table(run, step, f"{step.mode.name} step, batch {cfg.train.batch_size}"))
    if captured:
        parts.profile(profile_table(run, eager, f"{eager.mode.name} step (uncaptured), same batch"))
    parts.add("reference", run.device,
              reference_img_per_s=reference_images_per_s(run, args.warmup, args.steps))


def measure_cached(args: argparse.Namespace, work_dir: str, parts: Parts) -> None:
    """(d): the cache covers only the images the timed steps use; its build rate gives the full
    build time."""
    out = parts.out
    full_images = out["num_train_images"]
    needed = max(out["steps"] + out["warmup"], EQUIVALENCE_STEPS) * args.batch_size
    cfg = bench_config(
        args,
        work_dir,
        **{
            "train.cache_teacher_features": True,
            "data.max_samples": needed if needed < full_images else None,
        },
    )
    run = make_run(cfg)
    cache = run.teacher_cache
    with open(os.path.join(cache.directory, "meta.json")) as f:
        build_seconds = json.load(f)["build_seconds"]
    views_per_s = cache.num_images * cache.num_views / max(build_seconds, 1e-9)
    full_bytes = full_images * cache.num_views * cache.num_tokens * cache.dim * 2
    parts.add("cache_build", run.device, cache_views=cache.num_views,
              cache_build_views_per_s=views_per_s, cache_full_gb=full_bytes / 1e9,
              cache_full_build_s_est=full_images * cache.num_views / views_per_s)
    step = make_train_step(run)
    captured = isinstance(step, CapturedStep)
    parts.add("cached_setup", **{f"cached_{k}": v for k, v in step.mode.record().items()})
    eager = check_and_time(parts, run, step, captured, args, "cached_")
    if captured:
        rate = steps_images_per_s(run, eager, args.steps, args.warmup)
        parts.add("cached_train_step_eager", run.device, cached_train_step_eager_img_per_s=rate)
    parts.syncs("cached_train_step", count_syncs(one_step(run, step), run.device))
    if captured:
        parts.syncs("cached_train_step_eager", count_syncs(one_step(run, eager), run.device))


def run50_estimates(out: Dict[str, Any]) -> Dict[str, float]:
    """Minutes for the default 50 epochs: measured epochs (live); the cache build plus epochs at
    (d)'s step rate and the live epoch's overhead beyond its steps (cached, when (d) was measured).
    Start-up (data, teacher) is not included."""
    estimates = {"epoch_over_b": out["epoch_img_per_s"] / out["train_step_img_per_s"],
                 "run50_min_est_live": 50 * (out["epoch_s"] + out["epoch_end_s"]) / 60}
    if "cached_train_step_img_per_s" in out:
        images = out["steps_per_epoch"] * out["batch_size"]
        overhead = max(0.0, out["epoch_s"] - images / out["train_step_img_per_s"])
        cached_epoch = images / out["cached_train_step_img_per_s"] + overhead
        estimates["run50_min_est_cached"] = (out["cache_full_build_s_est"]
                                             + 50 * (cached_epoch + out["epoch_end_s"])) / 60
    return estimates


def peak_memory(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    parts = Parts(args)
    with tempfile.TemporaryDirectory(prefix="kd_bench_") as work_dir:
        if args.smoke:
            make_smoke_data(os.path.join(work_dir, "smoke_data"))
        measure_live(args, work_dir, parts)
        if not args.no_cached:
            measure_cached(args, work_dir, parts)
    out = parts.out
    b = out["train_step_img_per_s"]
    peaks = [v for v in out["peak_gpu_mem_gib_by_part"].values() if v is not None]
    checks = [out[k]["captured_ok"] for k in ("captured_check", "cached_captured_check")
              if k in out]
    if not args.no_cached:
        out["ratio_d_over_b"] = out["cached_train_step_img_per_s"] / b
    out.update(**run50_estimates(out), ratio_b_over_a=b / out["reference_img_per_s"],
               ratio_b_over_c=b / out["teacher_forward_img_per_s"],
               captured_ok=all(checks) if checks else None,
               peak_gpu_mem_gib=max(peaks) if peaks else None,
               seconds=time.perf_counter() - parts.started,
               cuda=torch.version.cuda, **run_metadata())
    return out


def to_json(value: Any) -> str:
    def plain(v: Any) -> Any:  # NaN/inf as null: JSON has no such numbers
        return None if isinstance(v, float) and not math.isfinite(v) else str(v)
    return json.dumps(value, default=plain)


OUTPUT_SUFFIXES = {"output": ".json", "parts": ".jsonl", "profile": ".txt"}


def check_output_paths(args: argparse.Namespace) -> None:
    """--output, --parts, --profile: writable files in existing folders, none of them a training
    run's own file (checkpoint.check_output_file), checked before minutes of benchmarking."""
    for flag, suffix in OUTPUT_SUFFIXES.items():
        path = getattr(args, flag)
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise UserError(f"--{flag} {path} is a folder; name a file in it, e.g. "
                            f"{os.path.join(path, 'bench' + suffix)}")
        if not os.path.isdir(folder):
            raise UserError(f"--{flag} {path}: folder {folder} does not exist; create it "
                            f"(mkdir -p {folder}) or name a file in an existing folder")
        check_output_file(f"--{flag}", path, suffix, beside=())


@one_line_warnings()
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # tiny models gain nothing from intra-op threads, and spin-waiting ones crawl on a busy CI box
    if args.smoke:
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(xFormers|RANDOMLY INITIALISED).*")
    try:
        check_output_paths(args)
        result = benchmark(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = to_json(result)
    print(line, flush=True)
    if args.output:
        with open(args.output, "w") as f:
            f.write(line + "\n")
    return 0

if __name__ == "__main__":
    sys.exit(main())
