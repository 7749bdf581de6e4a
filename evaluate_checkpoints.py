"""Linear-probe and k-NN evaluation of distillation checkpoints, against teacher and untrained-student baselines.

Launch (the seed's command line still works):
    python evaluate_checkpoints.py --model_config model_config_kd.yaml --checkpoint_dir checkpoints/kd \
        --dataset cifar10 --epochs 1 10 20 50 --batch_size 128 --device cuda --eval_teacher --eval_untrained
    python evaluate_checkpoints.py --checkpoint_dir checkpoints/kd      # every checkpoint_epoch_*.pth found there
    python evaluate_checkpoints.py --checkpoint_dir checkpoints/kd --data_config data_config.yaml \
        --linear_probe_C 1.0       # also the seed's fixed-C probe, reported next to the validated one

In-process (the experiment runner):
    from evaluate_checkpoints import evaluate_run
    entries = evaluate_run("checkpoints/kd", [1, 50], eval_teacher=True, eval_untrained=True)

Per checkpoint_epoch_{N}.pth, on the un-augmented train and test images (transforms.eval_view, bf16 on CUDA):
  - feature: the student's CLS token at student_img_size (mean patch token when model.use_cls_token is false);
  - linear probe on standardized features, weight decay chosen on a stratified 10 % validation split of train,
    refit on all of train, test accuracy measured once (metrics.linear_probe);
  - DINO's weighted k-NN (cosine, k = 20, T = 0.07);
  - test-set diagnostics: mean pairwise cosine (collapsed if > 0.7), feature std, effective rank and, when the
    teacher is available, cos(projected student CLS, teacher CLS) and linear CKA(student, teacher).
The architecture and data come from the config stored in the checkpoint; --data_config replaces the data section.
Older seed checkpoints (no stored config, `_orig_mod.`/`module.` prefixes) are detected and take their
architecture from --model_config.

Writes <checkpoint_dir>/eval_results.json (or --output_file) and, beside it, the same stem .md (table) and .png
(accuracy vs epoch, training loss from <checkpoint_dir>/log.jsonl). Exit codes: 0 done, 2 a user mistake or nothing
could be evaluated (one line on stderr naming the reason).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import metrics
from checkpoint import load_checkpoint, strip_prefixes
from config import (DEFAULT_FILES, ArgumentParser, Config, DataConfig, ModelConfig, TrainConfig, UserError,
                    build_section, config_from_dict, read_yaml)
from data_loader import load_split
from distill_loss import DistillLoss
from models import autocast_dtype, build_student, pooled_feature, student_tokens
from transforms import identity_params, model_inputs

HERE = os.path.dirname(os.path.abspath(__file__))
KNN_K, KNN_TEMPERATURE = 20, 0.07  # DINO eval_knn defaults
VAL_FRACTION = 0.1  # share of train held out to choose the probe's weight decay
CHECKPOINT_RE = re.compile(r"checkpoint_epoch_(\d+)\.pth$")


class NothingEvaluated(UserError):
    """Checkpoints were found but none could be evaluated; one line with the (first) reason, exit code 2."""


def note(msg: str) -> None:
    """A one-line warning on stderr: the run goes on."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- options
@dataclass
class Options:
    checkpoint_dir: str
    epochs: Optional[List[int]]  # None = every checkpoint_epoch_*.pth in checkpoint_dir
    data: Optional[DataConfig]  # from --data_config: replaces every checkpoint's data section
    model: ModelConfig  # from --model_config: architecture of checkpoints that store no config
    model_source: str  # the file `model` came from, for error lines
    dataset: Optional[str]
    num_workers: Optional[int]
    eval_teacher: bool
    eval_untrained: bool
    device: torch.device
    batch_size: int
    linear_probe_C: Optional[float]
    output_file: str


def resolve_device(requested: Optional[str]) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} but torch sees no CUDA GPU; use --device cpu or run on a GPU node")
    return device


def make_options(checkpoint_dir: str, epochs: Optional[Sequence[int]], data_cfg_path: Optional[str],
                 model_cfg_path: Optional[str], dataset: Optional[str], num_workers: Optional[int],
                 eval_teacher: bool, eval_untrained: bool, device: Optional[str], batch_size: int,
                 linear_probe_C: Optional[float], output_file: Optional[str]) -> Options:
    """Validates everything that does not need a checkpoint; each mistake is a one-line UserError."""
    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"--checkpoint_dir {checkpoint_dir}: directory not found; pass the run's train.checkpoint_dir")
    if epochs is not None and any(e < 0 for e in epochs):
        raise UserError(f"--epochs {' '.join(map(str, epochs))}: epochs are completed epochs and cannot be negative")
    if batch_size <= 0:
        raise UserError(f"--batch_size must be > 0, got {batch_size}")
    if linear_probe_C is not None and not linear_probe_C > 0:
        raise UserError(f"--linear_probe_C must be > 0, got {linear_probe_C}")
    if num_workers is not None and num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {num_workers}")
    if dataset is not None and dataset not in ("cifar10", "cifar100", "imagefolder"):
        raise UserError(f"--dataset must be one of cifar10, cifar100, imagefolder, got {dataset!r}")
    output_file = output_file or os.path.join(checkpoint_dir, "eval_results.json")
    out_dir = os.path.dirname(os.path.abspath(output_file))
    existing = out_dir  # the folder is created later: judge its nearest existing ancestor (a file blocks it too)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):  # fail before minutes of evaluation
        raise UserError(f"--output_file {output_file}: {out_dir} is not writable; pass a writable --output_file")
    model_path = model_cfg_path or os.path.join(HERE, DEFAULT_FILES["model"])
    data = build_section("data", read_yaml(data_cfg_path), data_cfg_path) if data_cfg_path else None
    return Options(
        checkpoint_dir=checkpoint_dir, epochs=None if epochs is None else sorted(set(epochs)), data=data,
        model=build_section("model", read_yaml(model_path), model_path), model_source=model_path,
        dataset=dataset, num_workers=num_workers,
        eval_teacher=eval_teacher, eval_untrained=eval_untrained, device=resolve_device(device),
        batch_size=batch_size, linear_probe_C=linear_probe_C,
        output_file=output_file)


def find_checkpoints(opts: Options) -> List[Tuple[int, str]]:
    """(epoch, path) of the requested checkpoints; missing epochs are one line, none at all a UserError."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(opts.checkpoint_dir), "checkpoint_epoch_*.pth")):
        match = CHECKPOINT_RE.search(os.path.basename(path))
        if match:
            found[int(match.group(1))] = path
    wanted = opts.epochs if opts.epochs is not None else sorted(found)
    present = [e for e in wanted if e in found]
    missing = [e for e in wanted if e not in found]
    have = ", ".join(map(str, sorted(found))) or "none"
    if not present:
        what = f"epochs {', '.join(map(str, wanted))}" if wanted else "any epoch"
        raise UserError(f"no checkpoint_epoch_{{N}}.pth for {what} in {opts.checkpoint_dir} (present: {have}); "
                        f"pass --epochs from the present ones or point --checkpoint_dir at the run")
    if missing:
        note(f"epochs {', '.join(map(str, missing))} missing in {opts.checkpoint_dir} (present: {have}); "
             f"evaluating {', '.join(map(str, present))}")
    return [(e, found[e]) for e in present]


# ----------------------------------------------------------------- checkpoints
def checkpoint_config(ckpt: Dict[str, Any], path: str, opts: Options) -> Tuple[Config, bool]:
    """The config to evaluate `ckpt` with, and whether it is a seed-format file (no stored config)."""
    if not isinstance(ckpt.get("student"), dict):
        raise UserError(f"checkpoint {path} has no 'student' state dict; not a distill_trainer.py checkpoint")
    seed_format = ckpt.get("config") is None
    if seed_format:
        default_data = os.path.join(HERE, DEFAULT_FILES["data"])
        data = opts.data or build_section("data", read_yaml(default_data), default_data)
        cfg = Config(data, TrainConfig(), opts.model)  # train defaults: seed 0, distill objective
    else:
        cfg = config_from_dict(ckpt["config"], path)
        cfg.data = opts.data or cfg.data
    return cfg, seed_format


def first_mismatch(model_state: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> Optional[str]:
    for key, value in model_state.items():
        if key not in state:
            return f"'{key}' missing in the file"
        if tuple(state[key].shape) != tuple(value.shape):
            return f"'{key}' is {list(state[key].shape)} in the file, {list(value.shape)} in the model"
    for key in state:
        if key not in model_state:
            return f"'{key}' in the file is not in the model"
    return None


def load_student(ckpt: Dict[str, Any], cfg: Config, path: str, arch_source: str) -> nn.Module:
    """The checkpoint's student, prefixes stripped; weights that do not fit are one line naming the first key."""
    student = build_student(cfg.model)
    own = student.state_dict()
    state = strip_prefixes(ckpt["student"])
    # A classifier head is not part of the features the probe reads: an older file's head is dropped, not an error.
    state = {k: v for k, v in state.items() if k in own or not k.startswith("head.")}
    problem = first_mismatch(own, state)
    if problem is not None:
        raise UserError(f"checkpoint {path} does not fit {cfg.model.student_name} {cfg.model.student_kwargs} at "
                        f"{cfg.model.student_img_size} px (architecture from {arch_source}): first mismatching key "
                        f"{problem}; pass the model config it was trained with")
    student.load_state_dict(state)
    return student.eval()


def untrained_student(cfg: Config) -> nn.Module:
    """The random init distill_trainer.build_run starts from: torch.manual_seed(train.seed), then build_student."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream as it was
        torch.manual_seed(cfg.train.seed)
        return build_student(cfg.model).eval()


# ----------------------------------------------------------------- features
@dataclass
class Data:
    train_images: torch.Tensor  # uint8 on the evaluation device
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    description: str


@dataclass
class Features:
    train: torch.Tensor  # [N, D] float32 probe features
    test: torch.Tensor
    test_cls: torch.Tensor  # CLS token of the test images: input of the checkpoint's projection
    seconds: float = 0.0


@dataclass
class TeacherFeatures(Features):
    embed_dim: int = 0
    grid_size: Tuple[int, int] = (0, 0)
    description: str = ""


def data_key(d: DataConfig) -> Tuple:
    return (d.dataset_name, os.path.abspath(os.path.expanduser(d.dataset_root)), d.max_samples, d.cache_dir)


def teacher_key(m: ModelConfig) -> Tuple:
    return (m.teacher_name, m.teacher_img_size, m.teacher_pretrained, m.teacher_weights, m.teacher_source,
            json.dumps(m.teacher_kwargs, sort_keys=True))


class Evaluator:
    """Evaluates checkpoints one by one; data and teacher features are computed once and shared by all of them."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.device = opts.device
        self.amp = autocast_dtype("auto", opts.device)  # bf16 on Ampere+ GPUs, as in training
        self.reference: Optional[Config] = None  # config of the first evaluated checkpoint: baselines use it
        self._data: Dict[Tuple, Data] = {}
        self._teachers: Dict[Tuple, Optional[TeacherFeatures]] = {}
        self._warned: set = set()
        self.skipped: List[str] = []  # why checkpoints could not be evaluated, reported after the loop
        self.shared_seconds = 0.0  # data loading and teacher features, computed once for all entries

    def warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            note(msg)

    # ------------------------------------------------------------- data
    def data_config(self, d: DataConfig, source: str) -> DataConfig:
        """Applies --dataset (seed compatibility; warns when it contradicts `source`) and --num_workers."""
        flags = {}
        if self.opts.dataset is not None:
            if self.opts.dataset != d.dataset_name:
                self.warn_once(f"--dataset {self.opts.dataset} overrides data.dataset_name={d.dataset_name} "
                               f"from {source}")
            flags["dataset_name"] = self.opts.dataset
        if self.opts.num_workers is not None:
            flags["num_workers"] = self.opts.num_workers
        return dataclasses.replace(d, **flags)

    def data(self, d: DataConfig) -> Data:
        key = data_key(d)
        if key not in self._data:
            started = time.time()
            train_images, train_labels, classes = load_split(d, "train")
            test_images, test_labels, _ = load_split(d, "test")
            # The whole uint8 split lives on the device; eval_view runs there batch by batch, no DataLoader.
            self._data[key] = Data(train_images.to(self.device), train_labels.to(self.device),
                                   test_images.to(self.device), test_labels.to(self.device), len(classes),
                                   f"{d.dataset_name} {d.dataset_root} ({len(train_labels)} train / "
                                   f"{len(test_labels)} test, {len(classes)} classes)")
            self.shared_seconds += self.sync_time(started)
        return self._data[key]

    # ------------------------------------------------------------- features
    def extract(self, forward: Callable, images: torch.Tensor, size: int,
                via_size: Optional[int] = None) -> List[torch.Tensor]:
        """Runs `forward` over all images at `size` px; returns each of its outputs concatenated, float32.

        via_size: first resize to this (the student's) size, then to `size`, as the trainer feeds its teacher.
        """
        parts = []
        with torch.inference_mode():
            for start in range(0, len(images), self.opts.batch_size):
                batch = images[start:start + self.opts.batch_size]
                params = identity_params(len(batch), batch.device)
                x = (model_inputs(batch, params, size)[0] if via_size is None else
                     model_inputs(batch, params, via_size, teacher_size=size)[1])
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    parts.append([out.float() for out in forward(x)])
        # Concatenated outside inference mode: the probe's autograd may save these tensors for backward.
        return [torch.cat(outs) for outs in zip(*parts)]

    def student_features(self, student: nn.Module, cfg: Config, data: Data) -> Features:
        started = time.time()
        student = student.to(self.device)

        def forward(x):
            cls, patches = student_tokens(student, x)
            return cls, pooled_feature(cls, patches, cfg.model.use_cls_token)

        size = cfg.model.student_img_size
        _, train = self.extract(forward, data.train_images, size)
        test_cls, test = self.extract(forward, data.test_images, size)
        return Features(train, test, test_cls, self.sync_time(started))

    def teacher_features(self, cfg: Config, data: Data) -> Optional[TeacherFeatures]:
        """The teacher's CLS features, built and computed once per (teacher, data); None if it cannot be built.

        A teacher that cannot be built is fatal only under --eval_teacher; otherwise its diagnostics are skipped.
        """
        key = (teacher_key(cfg.model), data_key(cfg.data))
        if key not in self._teachers:
            from dinov2_patcher import build_teacher  # hub/download logic only when a teacher is wanted
            started = time.time()
            try:
                torch.manual_seed(cfg.train.seed)  # a random-init teacher (smoke runs) matches the trainer's
                teacher = build_teacher(cfg.model, self.device)
            except UserError as e:
                if self.opts.eval_teacher:
                    raise
                self.warn_once(f"teacher unavailable, student-teacher diagnostics skipped: {e}")
                self._teachers[key] = None
                return None
            sizes = (cfg.model.teacher_img_size, cfg.model.student_img_size)
            train, = self.extract(lambda x: teacher(x)[:1], data.train_images, *sizes)
            test, = self.extract(lambda x: teacher(x)[:1], data.test_images, *sizes)
            seconds = self.sync_time(started)
            self.shared_seconds += seconds
            self._teachers[key] = TeacherFeatures(train, test, test, seconds, teacher.embed_dim,
                                                  teacher.grid_size, teacher.description)
            del teacher  # only its features are needed from here on
        return self._teachers[key]

    def sync_time(self, started: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.time() - started

    # ------------------------------------------------------------- probes
    def probe(self, feats: Features, data: Data) -> Dict[str, Any]:
        """Validated linear probe, optional fixed-C seed probe, k-NN and collapse diagnostics on the test features."""
        split = (feats.train, data.train_labels, feats.test, data.test_labels)
        linear = metrics.linear_probe(*split, data.num_classes, val_fraction=VAL_FRACTION, device=self.device)
        C = self.opts.linear_probe_C
        return {
            "linear_acc": linear["acc"],
            "linear_reg": {"param": linear.get("param"), "chosen": linear["chosen"],
                           "val_acc": linear.get("val_acc")},
            "linear_probe_C": C,
            "linear_acc_fixed_C": metrics.seed_probe(*split, C=C) if C is not None else None,
            "knn_acc": metrics.knn_accuracy(*split, data.num_classes, k=KNN_K, temperature=KNN_TEMPERATURE),
            "diagnostics": {**metrics.collapse_diagnostics(feats.test), "student_teacher_cos": None,
                            "cka_teacher": None},
        }

    def teacher_diagnostics(self, feats: Features, teacher: Optional[TeacherFeatures], cfg: Config,
                            student: nn.Module, projection_state: Optional[dict], path: str) -> Dict[str, Any]:
        """Linear CKA(student, teacher) and, with the checkpoint's projection, cos(P_cls s_cls, teacher target)."""
        if teacher is None:
            return {}
        out = {"cka_teacher": metrics.linear_cka(feats.test, teacher.test)}
        if not isinstance(projection_state, dict):  # supervised runs and seed files without a projection
            return out
        criterion = DistillLoss(student.num_features, teacher.embed_dim, tuple(student.patch_embed.grid_size),
                                teacher.grid_size, cfg.train.distill_loss_weights, cfg.model.projection,
                                cfg.model.projection_seed, cfg.model.target_norm)
        try:
            criterion.load_state_dict(strip_prefixes(projection_state))
        except RuntimeError as e:
            note(f"checkpoint {path}: projection does not fit ({str(e).splitlines()[0][:120]}); "
                 f"cos(projected student, teacher) skipped")
            return out
        criterion.to(self.device)
        with torch.no_grad():
            # The same target the loss used: teacher CLS after the checkpoint's target normalization.
            target, _ = criterion.normalize_targets(teacher.test, teacher.test[:, None])
            out["student_teacher_cos"] = metrics.mean_cosine(criterion.cls_proj(feats.test_cls), target)
        return out

    # ------------------------------------------------------------- entries
    def evaluate_checkpoint(self, epoch: int, path: str) -> Optional[Dict[str, Any]]:
        """One checkpoint's entry, or None after one line saying why it was skipped (corrupt, does not fit)."""
        started = time.time()
        try:
            ckpt = load_checkpoint(path)
            cfg, seed_format = checkpoint_config(ckpt, path, self.opts)
            source = self.opts.model_source if seed_format else f"the config stored in {path}"
            student = load_student(ckpt, cfg, path, source)
        except UserError as e:
            self.skipped.append(str(e))
            return None
        projection_state = ckpt.get("projection")
        del ckpt  # optimizer state: not needed, and as large as the model twice over
        cfg.data = self.data_config(cfg.data, "--data_config" if self.opts.data else path)
        self.reference = self.reference or cfg
        return self.evaluate_student(f"epoch_{epoch}", "checkpoint", epoch, path, cfg, student, projection_state,
                                     started)

    def evaluate_untrained(self) -> Dict[str, Any]:
        # No projection: the untrained student has no trained map into the teacher space, only CKA applies.
        return self.evaluate_student("untrained", "untrained", None, None, self.reference,
                                     untrained_student(self.reference), None, time.time())

    def evaluate_student(self, name: str, kind: str, epoch: Optional[int], path: Optional[str], cfg: Config,
                         student: nn.Module, projection_state: Optional[dict], started: float) -> Dict[str, Any]:
        shared_before = self.shared_seconds
        data = self.data(cfg.data)
        feats = self.student_features(student, cfg, data)
        teacher = self.teacher_features(cfg, data) if self.wants_teacher(cfg) else None
        result = self.probe(feats, data)
        result["diagnostics"].update(self.teacher_diagnostics(feats, teacher, cfg, student, projection_state,
                                                              path or name))
        # Data loading and teacher features happen once for all entries: they are not this entry's seconds.
        seconds = time.time() - started - (self.shared_seconds - shared_before)
        return make_entry(name, kind, epoch, path, cfg, data, feats, result, seconds)

    def wants_teacher(self, cfg: Config) -> bool:
        return self.opts.eval_teacher or cfg.train.objective == "distill"

    def evaluate_teacher(self) -> Dict[str, Any]:
        cfg = self.reference
        data = self.data(cfg.data)
        teacher = self.teacher_features(cfg, data)  # under --eval_teacher a teacher that cannot be built is fatal
        started = time.time()
        result = self.probe(teacher, data)
        # Its feature extraction is counted here, whichever entry first needed it.
        entry = make_entry("teacher", "teacher", None, cfg.model.teacher_weights, cfg, data, teacher, result,
                           teacher.seconds + time.time() - started)
        entry.update(feature="teacher CLS", img_size=cfg.model.teacher_img_size, description=teacher.description)
        return entry


def make_entry(name: str, kind: str, epoch: Optional[int], path: Optional[str], cfg: Config, data: Data,
               feats: Features, result: Dict[str, Any], seconds: float) -> Dict[str, Any]:
    return {"name": name, "kind": kind, "epoch": epoch, "path": path, "data": data.description,
            "feature": "CLS" if cfg.model.use_cls_token else "mean patch token", "dim": int(feats.train.shape[1]),
            "img_size": cfg.model.student_img_size, **result, "seconds": seconds}


def summary_line(e: Dict[str, Any]) -> str:
    d = e["diagnostics"]
    fixed = (f" | seed probe C={e['linear_probe_C']:g}: {e['linear_acc_fixed_C']:.2f}%"
             if e.get("linear_acc_fixed_C") is not None else "")
    teacher = f" | CKA(s,t) {d['cka_teacher']:.3f}" if d.get("cka_teacher") is not None else ""
    return (f"{e['name']}: linear {e['linear_acc']:.2f}% ({e['linear_reg']['param']} "
            f"{e['linear_reg']['chosen']:g}){fixed} | kNN {e['knn_acc']:.2f}% | pairwise cos "
            f"{d['pairwise_cos']:.3f}{' (collapsed)' if d['collapsed'] else ''} | eff. rank "
            f"{d['effective_rank']:.1f}{teacher} | {e['seconds']:.1f} s")


# ----------------------------------------------------------------- outputs
def finite(obj: Any) -> Any:
    """NaN/inf -> None, so the results file stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_atomic(path: str, payload: bytes) -> None:
    """Temp file in the same directory, then os.replace: readers never see half a results file."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); pass a writable --output_file") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def run_header(opts: Options, seconds: float, shared_seconds: float) -> Dict[str, Any]:
    import platform
    from checkpoint import run_metadata  # git sha, python, torch, torchvision, timm, gpu
    cuda = opts.device.type == "cuda"
    return {**run_metadata(), "device": str(opts.device),
            "device_name": torch.cuda.get_device_name(opts.device) if cuda else (platform.processor() or "cpu"),
            "cuda": torch.version.cuda if cuda else None, "autocast": "bf16" if cuda else "fp32",
            "checkpoint_dir": os.path.abspath(opts.checkpoint_dir), "batch_size": opts.batch_size,
            "linear_probe": {"standardized": True, "val_fraction": VAL_FRACTION, "fixed_C": opts.linear_probe_C},
            "knn": {"k": KNN_K, "temperature": KNN_TEMPERATURE},
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds_total": seconds,
            "seconds_data_and_teacher_features": shared_seconds}


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def table_columns(with_fixed_C: bool) -> List[Tuple[str, Callable, str]]:
    """(title, getter, format) of the markdown table; the JSON holds the unrounded values."""
    d = lambda key: (lambda e: e["diagnostics"].get(key))  # noqa: E731
    columns = [("name", lambda e: e["name"], "s"), ("epoch", lambda e: e["epoch"], "d"),
               ("linear %", lambda e: e["linear_acc"], ".2f"), ("wd", lambda e: e["linear_reg"]["chosen"], "g")]
    if with_fixed_C:
        columns.append(("linear % fixed C", lambda e: e["linear_acc_fixed_C"], ".2f"))
    return columns + [("kNN %", lambda e: e["knn_acc"], ".2f"), ("pairwise cos", d("pairwise_cos"), ".3f"),
                      ("collapsed", d("collapsed"), ""), ("feature std", d("feature_std"), ".4f"),
                      ("eff. rank", d("effective_rank"), ".1f"), ("cos(Ps,t)", d("student_teacher_cos"), ".3f"),
                      ("CKA(s,t)", d("cka_teacher"), ".3f"), ("seconds", lambda e: e["seconds"], ".1f")]


def markdown_report(entries: List[Dict[str, Any]], header: Dict[str, Any]) -> str:
    columns = table_columns(any(e.get("linear_acc_fixed_C") is not None for e in entries))
    lines = [f"# Evaluation of {header['checkpoint_dir']}", "",
             f"{header['device_name']} ({header['device']}, {header['autocast']}), torch {header['torch']}, "
             f"timm {header['timm']}, git {header['git_sha'][:12]}, {header['created']}; data: {entries[0]['data']}",
             "",
             f"Linear probe: standardized features, weight decay (wd) chosen on a stratified {VAL_FRACTION:.0%} "
             f"validation split of train. kNN: k={KNN_K}, T={KNN_TEMPERATURE}. Diagnostics on test features; "
             f"collapsed = pairwise cos > {getattr(metrics, 'COLLAPSE_COS', 0.7)}.", "",
             "| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for e in entries:
        lines.append("| " + " | ".join(_cell(get(e), spec) for _, get, spec in columns) + " |")
    return "\n".join(lines) + "\n"


def read_loss_log(checkpoint_dir: str) -> List[Tuple[int, float]]:
    """(epoch, mean training loss) from the trainer's log.jsonl; absent file or odd lines are skipped."""
    path = os.path.join(checkpoint_dir, "log.jsonl")
    points = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)):
                    points.append((int(record["epoch"]), float(record["loss"])))
    return points


def plot_png(entries: List[Dict[str, Any]], loss_log: List[Tuple[int, float]], title: str) -> bytes:
    """Accuracy vs epoch (baselines as horizontal lines) and, below it, the training loss. PNG bytes (Agg)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state in the caller's process
    from matplotlib.ticker import MaxNLocator

    rows = 2 if loss_log else 1
    fig = Figure(figsize=(7.5, 3.4 * rows + 0.4))
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    points = sorted((e for e in entries if e["kind"] == "checkpoint"), key=lambda e: e["epoch"])
    epochs = [e["epoch"] for e in points]
    ax = axes[0]
    ax.plot(epochs, [e["linear_acc"] for e in points], "o-", color="C0", label="student linear probe")
    ax.plot(epochs, [e["knn_acc"] for e in points], "s--", color="C1", label=f"student {KNN_K}-NN")
    for e, color in zip((e for e in entries if e["kind"] != "checkpoint"), ("C2", "C3", "C4")):
        ax.axhline(e["linear_acc"], color=color, ls="-", lw=1.2, label=f"{e['name']} linear probe")
        ax.axhline(e["knn_acc"], color=color, ls=":", lw=1.2, label=f"{e['name']} {KNN_K}-NN")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if loss_log:
        axes[1].plot([p[0] for p in loss_log], [p[1] for p in loss_log], ".-", color="C7")
        axes[1].set_ylabel("training loss (log.jsonl)")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_outputs(entries: List[Dict[str, Any]], header: Dict[str, Any], opts: Options) -> str:
    """JSON, markdown (same stem, .md) and PNG (same stem, .png); returns the markdown table."""
    stem = os.path.splitext(opts.output_file)[0]
    write_atomic(opts.output_file, json.dumps(finite({"header": header, "entries": entries}), indent=2).encode())
    report = markdown_report(entries, header)
    write_atomic(stem + ".md", report.encode())
    title = f"{os.path.basename(os.path.abspath(opts.checkpoint_dir))}: {entries[0]['data']}"
    write_atomic(stem + ".png", plot_png(entries, read_loss_log(opts.checkpoint_dir), title))
    return report


# ----------------------------------------------------------------- main
def evaluate_all(evaluator: Evaluator, paths: List[Tuple[int, str]]) -> List[Dict[str, Any]]:
    entries = []
    for epoch, path in paths:
        entry = evaluator.evaluate_checkpoint(epoch, path)
        if entry is not None:
            entries.append(entry)
            print(summary_line(entry), flush=True)
    if not entries:
        # Nothing usable: a single line carrying the reason, as for any other bad input.
        more = f" (and {len(evaluator.skipped) - 1} more)" if len(evaluator.skipped) > 1 else ""
        raise NothingEvaluated(f"no requested checkpoint in {evaluator.opts.checkpoint_dir} could be evaluated: "
                               f"{evaluator.skipped[0]}{more}")
    for reason in evaluator.skipped:
        note(f"skipped: {reason}")
    baselines = [(evaluator.opts.eval_teacher, evaluator.evaluate_teacher),
                 (evaluator.opts.eval_untrained, evaluator.evaluate_untrained)]
    for wanted, evaluate in baselines:
        if wanted:
            entries.append(evaluate())
            print(summary_line(entries[-1]), flush=True)
    return entries


def evaluate_run(checkpoint_dir: str, epochs: Optional[Sequence[int]] = None, data_cfg_path: Optional[str] = None,
                 model_cfg_path: Optional[str] = None, eval_teacher: bool = False, eval_untrained: bool = False,
                 device: Optional[str] = None, output_file: Optional[str] = None,
                 linear_probe_C: Optional[float] = None, batch_size: int = 128, dataset: Optional[str] = None,
                 num_workers: Optional[int] = None) -> List[Dict[str, Any]]:
    """Evaluates a run directory and writes the JSON/markdown/PNG results; returns the JSON entries.

    epochs=None evaluates every checkpoint_epoch_*.pth there. Raises UserError (one line) on bad input and
    NothingEvaluated (a UserError) when checkpoints exist but none could be evaluated.
    """
    started = time.time()
    opts = make_options(checkpoint_dir, epochs, data_cfg_path, model_cfg_path, dataset, num_workers, eval_teacher,
                        eval_untrained, device, batch_size, linear_probe_C, output_file)
    paths = find_checkpoints(opts)
    evaluator = Evaluator(opts)
    entries = evaluate_all(evaluator, paths)
    report = write_outputs(entries, run_header(opts, time.time() - started, evaluator.shared_seconds), opts)
    print("\n" + report, flush=True)
    print(f"wrote {opts.output_file} (+ .md, .png) in {time.time() - started:.1f} s", flush=True)
    return entries


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint_dir", required=True, help="the run's train.checkpoint_dir")
    p.add_argument("--epochs", type=int, nargs="+", default=None, help="default: every checkpoint_epoch_*.pth")
    p.add_argument("--model_config", default=None,
                   help="architecture for checkpoints that store no config (seed format); default: the repo's file")
    p.add_argument("--data_config", default=None, help="replaces the data config stored in the checkpoints")
    p.add_argument("--dataset", choices=("cifar10", "cifar100", "imagefolder"), default=None,
                   help="overrides data.dataset_name (seed compatibility)")
    p.add_argument("--batch_size", type=int, default=128, help="images per forward pass when extracting features")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--num_workers", type=int, default=None, help="overrides data.num_workers (image decoding)")
    p.add_argument("--output_file", default=None, help="default: <checkpoint_dir>/eval_results.json")
    p.add_argument("--eval_teacher", action="store_true", help="also probe the teacher's CLS features")
    p.add_argument("--eval_untrained", action="store_true", help="also probe the random-init student")
    p.add_argument("--linear_probe_C", type=float, default=None,
                   help="also report the seed's probe: LogisticRegression(C) on L2-normalized features")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*xFormers.*")
    try:
        evaluate_run(args.checkpoint_dir, args.epochs, args.data_config, args.model_config, args.eval_teacher,
                     args.eval_untrained, args.device, args.output_file, args.linear_probe_C, args.batch_size,
                     args.dataset, args.num_workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
