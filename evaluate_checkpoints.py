"""Linear-probe and k-NN evaluation of distillation checkpoints, against teacher and
untrained-student baselines.

Launch (the legacy command line still works):
    python evaluate_checkpoints.py --model_config model_config_kd.yaml --checkpoint_dir
    checkpoints/kd \
        --dataset cifar10 --epochs 1 10 20 50 --batch_size 128 --device cuda --eval_teacher
        --eval_untrained
    python evaluate_checkpoints.py --checkpoint_dir checkpoints/kd      # every
    checkpoint_epoch_*.pth found there python evaluate_checkpoints.py --checkpoint_dir
    checkpoints/kd --data_config data_config.yaml \
        --linear_probe_C 1.0       # also the legacy fixed-C probe, reported next to the validated
        one
    python evaluate_checkpoints.py --checkpoint_dir checkpoints/kd --loggers tensorboard wandb

In-process (the experiment runner):
    import evaluate_checkpoints as ev
    entries = ev.evaluate_run(ev.options("checkpoints/kd", epochs=[1, 50], eval_teacher=True,
    eval_untrained=True))

Per checkpoint_epoch_{N}.pth, on the un-augmented train and test images (transforms.model_inputs
with the identity view; student features in fp32, the teacher in bf16 on Ampere+ GPUs), batched on
the device: every probe of the table metrics.PROBES (docs/evaluation.md) on the features it reads:
  - the validated linear probe (standardized features, weight decay chosen on a stratified 10 %
    validation split of train), on the CLS token (mean patch token when model.use_cls_token is
    false) and on CLS + mean patch token ("CLS+patch"); the same probe fitted on a class-stratified
    1 % and 10 % of train (low-shot, the same images for every arm);
  - with --linear_probe_C, the legacy fixed-C probe (LogisticRegression(C), L2-normalized features);
  - DINO's weighted k-NN (cosine, k = 20, T = 0.07);
  - test-set diagnostics: mean pairwise cosine, feature std, effective rank, collapsed (centered:
    effective rank < 1.5) and the legacy criterion (mean pairwise cosine > 0.7) and, when the
    teacher is available, cos(projected student CLS, teacher CLS) and linear CKA(student, teacher).
A checkpoint of a train.ema_decay run is probed on its EMA weights (student_ema; --weights student:
the trained ones); its entry says which.
With --eval_teacher the teacher is probed twice: through the training path (32 -> student_img_size
-> teacher_img_size px, row "teacher") and directly (32 -> teacher_img_size px, row
"teacher_direct"). The architecture and data come from the config stored in the checkpoint;
--data_config replaces the data section. Legacy checkpoints (no stored config,
`_orig_mod.`/`module.` prefixes) are detected and take their architecture from --model_config.

Writes <checkpoint_dir>/eval_results.json (or --output_file) and, beside it, eval_predictions.npz
(every probe's int16 test predictions per entry, test labels, test_id: the report's paired
contrasts), the .md (table), the .png (accuracy vs epoch, training loss from
<checkpoint_dir>/log.jsonl). Exit codes: 0 done, 2 a user mistake or nothing could be evaluated (one
line on stderr naming the reason).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from torch import nn

import metrics
import report
from checkpoint import (atomic_write, check_output_file, load_checkpoint, run_metadata,
                        strip_prefixes)
from config import (DEFAULT_FILES, LOGGER_NAMES, SECTIONS, ArgumentParser, Config, DataConfig,
                    ModelConfig, TrainConfig, UserError, build_section, config_changes,
                    config_from_dict, one_line_warnings, read_yaml)
from data_loader import load_split
import distill_loss
from models import (autocast, autocast_dtype, build_student, initial_student, pooled_feature,
                    student_tokens)
from transforms import identity_params, model_inputs

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_RE = re.compile(r"checkpoint_epoch_(\d+)\.pth$")
DATASETS = ("cifar10", "cifar100", "imagefolder")
IN_MEMORY = ("predictions", "test_labels")  # entry keys saved to the .npz, not to the JSON


class NothingEvaluated(UserError):
    """Checkpoints were found but none could be evaluated; one line with the (first) reason, exit
    code 2."""


def note(msg: str) -> None:
    """A one-line warning on stderr: the run goes on."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- options
# The evaluator's flags, each described here only: parse_args builds the command line from this
# table, options() takes the same names as keywords (defaults from here) and checks them.
FLAGS: Dict[str, Dict[str, Any]] = {
    "epochs": dict(type=int, nargs="+", default=None,
                   help="completed epochs to probe (checkpoint_epoch_N.pth); default: every one"),
    "model_config": dict(default=None,
                         help="architecture for checkpoints that store no config (legacy format); "
                              "default: the repo's model_config_kd.yaml"),
    "data_config": dict(default=None, help="replaces the data config stored in the checkpoints"),
    "dataset": dict(choices=DATASETS, default=None,
                    help="overrides data.dataset_name (legacy command lines)"),
    "batch_size": dict(type=int, default=128,
                       help="images per forward pass when extracting features"),
    "device": dict(default=None, help="cuda, cuda:N or cpu; default: cuda if available, else cpu"),
    "num_workers": dict(type=int, default=None, help="overrides data.num_workers (image decoding)"),
    "output_file": dict(default=None,
                        help="results JSON; the .md, .png and predictions .npz go beside it; "
                             "default: <checkpoint_dir>/eval_results.json"),
    "eval_teacher": dict(action="store_true", default=False,
                         help="also probe the teacher (rows teacher and teacher_direct); an "
                              "unusable teacher is then an error"),
    "eval_untrained": dict(action="store_true", default=False,
                           help="also probe the random-init student"),
    "linear_probe_C": dict(type=float, default=None,
                           help="also run the legacy fixed-C probe: LogisticRegression(C) on "
                                "L2-normalized features"),
    "loggers": dict(nargs="+", choices=LOGGER_NAMES, default=[],
                    help="also log the results to the run's TensorBoard (tensorboard/eval/) and "
                         "W&B run"),
    "weights": dict(choices=("ema", "student"), default="ema",
                    help="student weights to probe: ema = student_ema where a checkpoint holds one "
                         "(train.ema_decay runs), else student; student = the trained weights"),
}


@dataclass(frozen=True)
class Options:
    """The checked FLAGS of one evaluation, configs read and the device resolved."""
    checkpoint_dir: str
    epochs: Optional[Tuple[int, ...]]  # None = every checkpoint
    data: Optional[DataConfig]  # --data_config, --dataset/--num_workers applied; None: the stored
    model: ModelConfig  # --model_config, read
    model_source: str  # the file `model` came from, for error lines
    dataset: Optional[str]
    num_workers: Optional[int]
    eval_teacher: bool
    eval_untrained: bool
    device: torch.device
    batch_size: int
    linear_probe_C: Optional[float]
    output_file: str  # filled in: never None
    weights: str
    loggers: Tuple[str, ...] = ()  # also to the run's TensorBoard / W&B (loggers.py)


def resolve_device(requested: Optional[str]) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(
            f"--device {requested!r} is not a device; use cuda, cuda:N or cpu"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {requested} but torch sees no CUDA GPU; use --device cpu or run on a GPU"
            " node"
        )
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise UserError(f"--device {requested}: torch sees {count} CUDA GPU(s), numbered from 0; "
                        f"pass one of them")
    if device.type not in ("cuda", "cpu"):  # mps, xpu, meta: the probes and autocast know these two
        raise UserError(f"--device {requested} is not supported; use cuda, cuda:N or cpu")
    return device


def options(checkpoint_dir: str, *, data: Optional[DataConfig] = None,
            model: Optional[ModelConfig] = None, **flags: Any) -> Options:
    """The options of one evaluation: `flags` are FLAGS by name (the rest take FLAGS' defaults);
    everything that does not need a checkpoint is checked here, each mistake a one-line UserError.
    `data` and `model` (for in-process callers) are sections used instead of the data_config and
    model_config files."""
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise TypeError(f"options() got unknown flags {unknown}; the flags are {', '.join(FLAGS)}")
    values = {name: flags.get(name, spec["default"]) for name, spec in FLAGS.items()}
    return checked_options(checkpoint_dir, data, model, **values)


def checked_options(checkpoint_dir: str, data: Optional[DataConfig], model: Optional[ModelConfig],
                    epochs: Optional[Sequence[int]], data_config: Optional[str],
                    model_config: Optional[str], dataset: Optional[str],
                    num_workers: Optional[int], eval_teacher: bool, eval_untrained: bool,
                    device: Optional[str], batch_size: int, linear_probe_C: Optional[float],
                    output_file: Optional[str], weights: str,
                    loggers: Sequence[str]) -> Options:
    if not os.path.isdir(checkpoint_dir):
        raise UserError(
            f"--checkpoint_dir {checkpoint_dir}: directory not found; pass the run's"
            " train.checkpoint_dir"
        )
    if epochs is not None and any(e < 0 for e in epochs):
        raise UserError(
            f"--epochs {' '.join(map(str, epochs))}: epochs are completed epochs and cannot be"
            " negative"
        )
    if batch_size <= 0:
        raise UserError(f"--batch_size must be > 0, got {batch_size}")
    if linear_probe_C is not None and not linear_probe_C > 0:
        raise UserError(f"--linear_probe_C must be > 0, got {linear_probe_C}")
    if num_workers is not None and num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {num_workers}")
    if set(loggers or ()) - set(LOGGER_NAMES):
        raise UserError(f"--loggers {' '.join(loggers)}: accepted names are "
                        f"{', '.join(LOGGER_NAMES)}")
    if dataset is not None and dataset not in DATASETS:
        raise UserError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    output_file = output_file or os.path.join(checkpoint_dir, "eval_results.json")
    # Before minutes of evaluation: the JSON, the .md and .png beside it, the predictions file.
    check_output_file("--output_file", output_file, also=[predictions_path(output_file)])
    if data is None and data_config:
        data = build_section("data", read_yaml(data_config), data_config)
    data_source = data_config or "the data section passed in"
    model_path = model_config or os.path.join(HERE, DEFAULT_FILES["model"])
    return Options(
        checkpoint_dir=checkpoint_dir,
        epochs=None if epochs is None else tuple(sorted(set(epochs))),
        data=data_flags(data, data_source, dataset, num_workers) if data else None,
        model=model or build_section("model", read_yaml(model_path), model_path),
        model_source="the model section passed in" if model else model_path,
        dataset=dataset,
        num_workers=num_workers,
        eval_teacher=eval_teacher,
        eval_untrained=eval_untrained,
        device=resolve_device(device),
        batch_size=batch_size,
        linear_probe_C=linear_probe_C,
        output_file=output_file,
        weights=weights,
        loggers=tuple(dict.fromkeys(loggers or ())),
    )


def data_flags(
    d: DataConfig, source: str, dataset: Optional[str], num_workers: Optional[int]
) -> DataConfig:
    """`d` with --dataset and --num_workers applied; one warning when --dataset contradicts
    `source`."""
    flags = {}
    if dataset is not None:
        if dataset != d.dataset_name:
            note(f"--dataset {dataset} overrides data.dataset_name={d.dataset_name} from {source}")
        flags["dataset_name"] = dataset
    if num_workers is not None:
        flags["num_workers"] = num_workers
    return dataclasses.replace(d, **flags)


def parse_args(argv: Optional[List[str]] = None) -> Options:
    p = ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                       epilog="The probes and their columns: docs/evaluation.md.")
    p.add_argument("--checkpoint_dir", required=True, help="the run's train.checkpoint_dir")
    for name, spec in FLAGS.items():
        p.add_argument(f"--{name}", **spec)
    args = vars(p.parse_args(argv))
    return options(args.pop("checkpoint_dir"), **args)


# ----------------------------------------------------------------- checkpoints
def find_checkpoints(opts: Options) -> List[Tuple[int, str]]:
    """(epoch, path) of the requested checkpoints; missing epochs are one line, none at all a
    UserError."""
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
        raise UserError(
            f"no checkpoint_epoch_{{N}}.pth for {what} in {opts.checkpoint_dir} (present: {have}); "
            "pass --epochs from the present ones or point --checkpoint_dir at the run"
        )
    if missing:
        note(
            f"epochs {', '.join(map(str, missing))} missing in {opts.checkpoint_dir} (present:"
            f" {have}); evaluating {', '.join(map(str, present))}"
        )
    return [(e, found[e]) for e in present]


def read_checkpoint(path: str, opts: Options) -> Tuple[Config, nn.Module, Optional[dict], str]:
    """The config to evaluate a checkpoint with, its student, its projection state and which weights
    the student holds: "student_ema" (train.ema_decay runs, unless --weights student: the EMA is
    what such a run is for) or "student"; problems are one line.

    Legacy files store no config: the architecture comes from --model_config, the data from
    --data_config or the repo's data file, train settings are the defaults (seed 0, distill
    objective).
    """
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("student"), dict):
        raise UserError(
            f"checkpoint {path} has no 'student' state dict; not a distill_trainer.py checkpoint"
        )
    if ckpt.get("config") is None:
        data_path = os.path.join(HERE, DEFAULT_FILES["data"])
        data = opts.data or build_section("data", read_yaml(data_path), data_path)
        cfg, arch_source = Config(data, TrainConfig(), opts.model), opts.model_source
    else:
        cfg, arch_source = config_from_dict(ckpt["config"], path), f"the config stored in {path}"
        check_same_run(path, ckpt["config"])
    has_ema = isinstance(ckpt.get("student_ema"), dict)
    weights = "student_ema" if has_ema and opts.weights == "ema" else "student"
    student = load_student(ckpt[weights], cfg, path, arch_source)
    bad = [k for k, v in student.state_dict().items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # the probe would fail minutes later on NaN features, naming nothing
        raise UserError(f"checkpoint {path} has non-finite (NaN/inf) weights in {len(bad)} tensors "
                        f"(e.g. '{bad[0]}'); it cannot be probed: evaluate the other epochs or "
                        f"retrain it")
    cfg.data = opts.data or data_flags(cfg.data, path, opts.dataset, opts.num_workers)
    return cfg, student, ckpt.get("projection"), weights


def check_same_run(path: str, stored: Dict[str, Any]) -> None:
    """A checkpoint copied in from another run (other data, classes, model) must not be tabled as
    this run's: its config is compared with the run's config.yaml, on the keys a resume would
    refuse (config.config_changes)."""
    run_file = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
    try:
        with open(run_file) as f:
            run_cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return  # no run file (a folder of copied checkpoints): nothing to compare with
    if not isinstance(run_cfg, dict):
        return
    refused, _ = config_changes({s: run_cfg.get(s) or {} for s in SECTIONS}, stored)
    if refused:
        listed = ", ".join(f"{k} {old!r} -> {new!r}"
                           for k, (old, new) in list(refused.items())[:3])
        raise UserError(f"checkpoint {path} is from another run than {run_file} ({listed}); "
                        f"evaluate it from its own run directory")


def first_mismatch(
    model_state: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]
) -> Optional[str]:
    for key, value in model_state.items():
        if key not in state:
            return f"'{key}' missing in the file"
        if tuple(state[key].shape) != tuple(value.shape):
            return (
                f"'{key}' is {list(state[key].shape)} in the file, {list(value.shape)} in the model"
            )
    for key in state:
        if key not in model_state:
            return f"'{key}' in the file is not in the model"
    return None


def load_student(
    state: Dict[str, torch.Tensor], cfg: Config, path: str, arch_source: str
) -> nn.Module:
    """The student with `state` loaded, prefixes stripped; weights that do not fit are one line
    naming the first key."""
    student = build_student(cfg.model)
    own = student.state_dict()
    state = strip_prefixes(state)
    # A classifier head is not part of the features the probe reads: an older file's head is
    # dropped, not an error.
    state = {k: v for k, v in state.items() if k in own or not k.startswith("head.")}
    problem = first_mismatch(own, state)
    if problem is not None:
        raise UserError(
            f"checkpoint {path} does not fit {cfg.model.student_name} {cfg.model.student_kwargs} at"
            f" {cfg.model.student_img_size} px (architecture from {arch_source}): first mismatching"
            f" key {problem}; pass the model config it was trained with"
        )
    student.load_state_dict(state)
    return student.eval()


def untrained_student(cfg: Config) -> nn.Module:
    """The random init distill_trainer.build_run starts from: torch.manual_seed(train.seed), then
    build_student."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream as it was
        return initial_student(cfg).eval()


# ----------------------------------------------------------------- data and features
@dataclass
class Data:
    train_images: torch.Tensor  # uint8 on the evaluation device
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    description: str
    test_id: Optional[str] = None  # computed on first use (test_id)


@dataclass
class Features:
    train: torch.Tensor  # [N, D] float32 probe features
    test: torch.Tensor
    test_cls: torch.Tensor  # CLS token of the test images: input of the checkpoint's projection
    # [N, 2D] CLS + mean patch token (the DINOv2 linear feature)
    train_cls_patch: Optional[torch.Tensor] = None
    test_cls_patch: Optional[torch.Tensor] = None


@dataclass
class TeacherFeatures(Features):
    seconds: float = 0.0  # building the teacher and extracting its features
    embed_dim: int = 0
    grid_size: Tuple[int, int] = (0, 0)
    description: str = ""


def data_key(d: DataConfig) -> Tuple:
    return (
        d.dataset_name,
        os.path.abspath(os.path.expanduser(d.dataset_root)),
        d.max_samples,
        d.cache_dir,
    )


def teacher_key(m: ModelConfig) -> Tuple:
    from dinov2_patcher import teacher_identity
    return (json.dumps(teacher_identity(m), sort_keys=True),)


def sync_time(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time() - started


def load_data(d: DataConfig, device: torch.device) -> Data:
    if d.dataset_name == "folder":
        raise UserError(
            f"data.dataset_name=folder ({d.dataset_root}) has no labels to probe with; pass"
            " --data_config with a labelled dataset (cifar10, cifar100 or imagefolder), e.g. the"
            " repo's data_config.yaml"
        )
    train_images, train_labels, classes = load_split(d, "train")
    test_images, test_labels, _ = load_split(d, "test")
    # The whole uint8 split lives on the device; the eval view is rendered there batch by batch, no
    # DataLoader.
    return Data(
        train_images.to(device),
        train_labels.to(device),
        test_images.to(device),
        test_labels.to(device),
        len(classes),
        f"{d.dataset_name} {d.dataset_root} ({len(train_labels)} train / {len(test_labels)} "
        f"test, {len(classes)} classes)",
    )


def extract_features(
    forward: Callable,
    images: torch.Tensor,
    opts: Options,
    size: int,
    teacher_size: Optional[int] = None,
    amp: Optional[torch.dtype] = None,
) -> List[torch.Tensor]:
    """Runs `forward` over all images, batched on the device, and returns each of its outputs
    concatenated, float32.

    The input is the whole image at `size` px or, with teacher_size, that view resized to
    teacher_size px: the trainer's teacher input. `amp` is the autocast dtype (None: fp32).
    """
    parts = []
    with torch.inference_mode():
        for start in range(0, len(images), opts.batch_size):
            batch = images[start:start + opts.batch_size]
            inputs = model_inputs(
                batch, identity_params(len(batch), batch.device), size, teacher_size
            )
            with autocast(opts.device, amp):
                parts.append(
                    [out.float() for out in forward(inputs[0 if teacher_size is None else 1])]
                )
    # Concatenated outside inference mode: the probe's autograd may save these tensors for backward.
    return [torch.cat(outs) for outs in zip(*parts)]


def cls_patch(cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """The DINOv2 paper's linear-probe feature: the CLS token concatenated with the mean of the
    patch tokens."""
    return torch.cat([cls, patches.mean(dim=1)], dim=1)


def student_features(student: nn.Module, cfg: Config, data: Data, opts: Options) -> Features:
    """Student features in fp32: in bf16 their rounding error is large next to the spread of
    narrow-cone features."""
    student = student.to(opts.device)

    def forward(x):
        cls, patches = student_tokens(student, x)
        return cls, pooled_feature(cls, patches, cfg.model.use_cls_token), cls_patch(cls, patches)

    _, train, train_cp = extract_features(
        forward, data.train_images, opts, cfg.model.student_img_size
    )
    test_cls, test, test_cp = extract_features(
        forward, data.test_images, opts, cfg.model.student_img_size
    )
    return Features(train, test, test_cls, train_cp, test_cp)


def load_teacher(cfg: Config, opts: Options) -> Optional[nn.Module]:
    """The frozen teacher; None, after one warning line, when it cannot be built and --eval_teacher
    is off."""
    from dinov2_patcher import build_teacher  # hub/download logic only when a teacher is wanted
    try:
        # a random-init teacher (smoke runs) matches the trainer's
        torch.manual_seed(cfg.train.seed)
        return build_teacher(cfg.model, opts.device)
    except UserError as e:
        if opts.eval_teacher:
            raise
        note(f"teacher unavailable, student-teacher diagnostics skipped: {e}")
        return None


def teacher_features(teacher: nn.Module, cfg: Config, data: Data, opts: Options,
                     direct: bool = False) -> TeacherFeatures:
    """The teacher's CLS (and CLS + mean patch) features through the training path (32 ->
    student_img_size -> teacher_img_size px) or, with `direct`, from the image resized straight to
    teacher_img_size."""
    sizes = (
        (cfg.model.teacher_img_size,)
        if direct
        else (cfg.model.student_img_size, cfg.model.teacher_img_size)
    )
    amp = autocast_dtype("auto", opts.device)  # the frozen teacher may stay in bf16, as in training

    def forward(x):
        cls, patches = teacher(x)
        return cls, cls_patch(cls, patches)

    train, train_cp = extract_features(forward, data.train_images, opts, *sizes, amp=amp)
    test, test_cp = extract_features(forward, data.test_images, opts, *sizes, amp=amp)
    return TeacherFeatures(
        train, test, test, train_cp, test_cp, 0.0, teacher.embed_dim, teacher.grid_size,
        teacher.description,
    )


class Shared:
    """Data, the teacher and its features, computed once per distinct config and shared by every
    entry, and their seconds."""

    def __init__(self, opts: Options):
        self.opts, self.seconds, self._values = opts, 0.0, {}

    def _once(self, key: Tuple, compute: Callable[[], Any]) -> Any:
        if key not in self._values:
            started = time.time()
            self._values[key] = compute()
            self.seconds += sync_time(started, self.opts.device)
        return self._values[key]

    def data(self, cfg: Config) -> Data:
        return self._once(
            ("data",) + data_key(cfg.data), lambda: load_data(cfg.data, self.opts.device)
        )

    def teacher(self, cfg: Config, data: Data, direct: bool = False) -> Optional[TeacherFeatures]:
        """Teacher features of one input path; the teacher itself is built once for both paths."""
        def compute() -> Optional[TeacherFeatures]:
            started = time.time()
            module_key = ("teacher_module",) + teacher_key(cfg.model)
            if module_key not in self._values:  # timed by the caller's _once
                self._values[module_key] = load_teacher(cfg, self.opts)
            module = self._values[module_key]
            if module is None:
                return None
            feats = teacher_features(module, cfg, data, self.opts, direct)
            # building (first path) and extracting
            feats.seconds = sync_time(started, self.opts.device)
            return feats

        key = (
            ("teacher", direct, cfg.model.student_img_size)
            + teacher_key(cfg.model)
            + data_key(cfg.data)
        )
        return self._once(key, compute)


# ----------------------------------------------------------------- probes
def probe(feats: Features, data: Data, opts: Options) -> Dict[str, Any]:
    """Every probe of metrics.PROBES on the features it reads (None where this entry has none of
    that kind), and the collapse diagnostics on the test features; "predictions": each probe's
    predicted test classes (int16), by its accuracy key, for eval_predictions.npz (not part of the
    JSON entry)."""
    kinds = {"pooled": (feats.train, feats.test),
             "cls_patch": (feats.train_cls_patch, feats.test_cls_patch)}
    result: Dict[str, Any] = {}
    predictions = {}
    for p in metrics.PROBES.values():
        train_x, test_x = kinds[p.feature]
        out = {"acc": None}
        if train_x is not None:
            given = metrics.ProbeData(train_x, data.train_labels, test_x, data.test_labels,
                                      data.num_classes, opts.device, opts.linear_probe_C)
            out = dict(p.fit_score(given))
        result[p.key] = out.pop("acc")
        if out.get("predictions") is not None:
            predictions[p.key] = out["predictions"].to(device="cpu", dtype=torch.int16).numpy()
        out.pop("predictions", None)
        result.update(out)
    result["num_test"] = len(data.test_labels)
    result["test_id"] = test_id(data)
    result["diagnostics"] = {**metrics.collapse_diagnostics(feats.test),
                             "student_teacher_cos": None, "cka_teacher": None}
    result["predictions"] = predictions
    result["test_labels"] = data.test_labels.cpu().numpy().astype(np.int16)
    return result


def test_id(data: Data) -> str:
    """Names the exact test images (a max_samples subset, a folder's contents): contrasts pair runs
    image by image only when their ids agree."""
    if data.test_id is None:
        digest = hashlib.sha256(data.test_labels.cpu().numpy().astype(np.int64).tobytes())
        digest.update(data.test_images.cpu().numpy().tobytes())
        data.test_id = digest.hexdigest()[:16]
    return data.test_id


def teacher_diagnostics(
    feats: Features,
    teacher: Optional[TeacherFeatures],
    cfg: Config,
    student: nn.Module,
    projection_state: Optional[dict],
    path: Optional[str],
    device: torch.device,
) -> Dict[str, Any]:
    """Linear CKA(student, teacher) and, with the checkpoint's projection, cos(P_cls s_cls, teacher
    target)."""
    if teacher is None:
        return {}
    out = {"cka_teacher": metrics.linear_cka(feats.test, teacher.test)}
    # supervised runs and legacy files carry no projection
    if not isinstance(projection_state, dict):
        return out
    if tuple(cfg.model.teacher_blocks) != (-1,):  # its targets are not the last block's features
        return out
    criterion = distill_loss.build_criterion(
        cfg, student.num_features, student.patch_embed.grid_size, teacher.embed_dim,
        teacher.grid_size, num_classes=None).distill
    try:
        criterion.load_state_dict(strip_prefixes(projection_state))
    except RuntimeError as e:
        note(f"checkpoint {path}: projection does not fit ({str(e).splitlines()[0][:120]}); "
             f"cos(projected student, teacher) skipped")
        return out
    # The target the loss used: teacher CLS after the checkpoint's target normalization.
    out["student_teacher_cos"] = criterion.to(device).cls_cosine(feats.test_cls, teacher.test)
    return out


# ----------------------------------------------------------------- entries
def make_entry(
    ident: Dict[str, Any],
    cfg: Config,
    data: Data,
    feats: Features,
    result: Dict[str, Any],
    seconds: float,
) -> Dict[str, Any]:
    """`ident` (name, kind, epoch, path) followed by what was probed and the results."""
    return {
        "weights": None,
        "ema_decay": None,
        **ident,
        "data": data.description,
        "num_classes": data.num_classes,
        "feature": "CLS" if cfg.model.use_cls_token else "mean patch token",
        "dim": int(feats.train.shape[1]),
        "img_size": cfg.model.student_img_size,
        **result,
        "seconds": seconds,
    }


def evaluate_student(
    ident: Dict[str, Any],
    student: nn.Module,
    cfg: Config,
    projection_state: Optional[dict],
    opts: Options,
    shared: Shared,
    started: float,
) -> Dict[str, Any]:
    shared_before = shared.seconds
    data = shared.data(cfg)
    feats = student_features(student, cfg, data, opts)
    teacher = (
        shared.teacher(cfg, data) if opts.eval_teacher or cfg.train.objective == "distill" else None
    )
    result = probe(feats, data, opts)
    result["diagnostics"].update(
        teacher_diagnostics(
            feats, teacher, cfg, student, projection_state, ident["path"], opts.device
        )
    )
    # Data loading and teacher features happen once for all entries: they are not this entry's
    # seconds.
    return make_entry(
        ident, cfg, data, feats, result, time.time() - started - (shared.seconds - shared_before)
    )


def checkpoint_entries(opts: Options, shared: Shared) -> Tuple[List[Dict[str, Any]], Config]:
    """An entry per requested checkpoint that can be used, and the config of the first: the
    baselines use it.

    A checkpoint that cannot be used (corrupt, does not fit) is one line after the others; if none
    can, that is NothingEvaluated, naming the first reason.
    """
    entries, skipped, reference = [], [], None
    for epoch, path in find_checkpoints(opts):
        started = time.time()
        try:
            cfg, student, projection_state, weights = read_checkpoint(path, opts)
        except UserError as e:
            skipped.append(str(e))
            continue
        reference = reference or cfg
        ident = {"name": f"epoch_{epoch}", "kind": "checkpoint", "epoch": epoch, "path": path,
                 "weights": weights,
                 "ema_decay": cfg.train.ema_decay if weights == "student_ema" else None}
        entries.append(
            evaluate_student(ident, student, cfg, projection_state, opts, shared, started)
        )
        print(summary_line(entries[-1]), flush=True)
    if not entries:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise NothingEvaluated(
            f"no requested checkpoint in {opts.checkpoint_dir} could be evaluated: "
            f"{skipped[0]}{more}"
        )
    for reason in skipped:
        note(f"skipped: {reason}")
    return entries, reference


def evaluate_teacher(
    cfg: Config, opts: Options, shared: Shared, direct: bool = False
) -> Dict[str, Any]:
    """The teacher's row: through the training path ("teacher") or resized straight to its size
    ("teacher_direct")."""
    data = shared.data(cfg)
    # under --eval_teacher a teacher that cannot be built is fatal
    teacher = shared.teacher(cfg, data, direct)
    started = time.time()
    result = probe(teacher, data, opts)
    name = "teacher_direct" if direct else "teacher"
    ident = {"name": name, "kind": "teacher", "epoch": None, "path": cfg.model.teacher_weights}
    # Its feature extraction is counted here, whichever entry first needed it.
    entry = make_entry(ident, cfg, data, teacher, result, teacher.seconds + time.time() - started)
    m = cfg.model
    random_init = m.teacher_source == "timm" and not m.teacher_pretrained and not m.teacher_weights
    path = (f"{data.train_images.shape[-1]} -> {m.teacher_img_size} px" if direct else
            f"{data.train_images.shape[-1]} -> {m.student_img_size} -> {m.teacher_img_size} px")
    entry.update(
        feature=f"teacher CLS ({path})",
        img_size=m.teacher_img_size,
        description=teacher.description,
        random_init=random_init,
    )
    return entry


def evaluate_untrained(cfg: Config, opts: Options, shared: Shared) -> Dict[str, Any]:
    # No projection: the untrained student has no trained map into the teacher space, only CKA
    # applies.
    ident = {"name": "untrained", "kind": "untrained", "epoch": None, "path": None,
             "weights": "student"}
    return evaluate_student(ident, untrained_student(cfg), cfg, None, opts, shared, time.time())


def weights_label(e: Dict[str, Any]) -> Optional[str]:
    """What a student row probed: its EMA (with the decay) or its weights; None: the teacher."""
    if e.get("weights") == "student_ema":
        return f"EMA {e['ema_decay']:g}" if e.get("ema_decay") is not None else "EMA"
    return e.get("weights")


def summary_line(e: Dict[str, Any]) -> str:
    d = e["diagnostics"]
    ema = " (EMA weights)" if e.get("weights") == "student_ema" else ""
    probes = []
    for p in metrics.PROBES.values():
        if e.get(p.key) is None:
            continue
        detail = f" ({p.detail[0]} {format(p.detail[1](e), p.detail[2])})" if p.detail else ""
        name = p.title[:-2] if p.title.endswith(" %") else p.title
        probes.append(f"{name} {e[p.key]:.2f}%{detail}")
    teacher = f" | CKA(s,t) {d['cka_teacher']:.3f}" if d["cka_teacher"] is not None else ""
    return (
        f"{e['name']}{ema}: {' | '.join(probes)} | pairwise cos"
        f" {d['pairwise_cos']:.3f}{' (legacy: collapsed)' if d['collapsed_legacy_cos'] else ''} |"
        f" eff. rank {d['effective_rank']:.1f}{collapse_note(d)}{teacher} | {e['seconds']:.1f} s"
    )


def collapse_note(d: Dict[str, Any]) -> str:
    """' (collapsed: <the figure that decided it>)' or ''; the rank shown beside it may be high when
    the spread decided (a constant output plus float noise has a high rank)."""
    if not d["collapsed"]:
        return ""
    spread = d.get("relative_spread")  # absent from results written before it was recorded
    if spread is not None and spread <= metrics.COLLAPSE_MIN_SPREAD:
        return f" (collapsed: spread {spread:.1e} of the norm < {metrics.COLLAPSE_MIN_SPREAD:g})"
    return f" (collapsed: rank < {metrics.COLLAPSE_MIN_RANK})"


# ----------------------------------------------------------------- outputs
def run_header(opts: Options, seconds: float, shared_seconds: float) -> Dict[str, Any]:
    cuda = opts.device.type == "cuda"
    return {
        **run_metadata(),
        "device": str(opts.device),
        "device_name": (
            torch.cuda.get_device_name(opts.device) if cuda else (platform.processor() or "cpu")
        ),
        "cuda": torch.version.cuda if cuda else None,
        # the teacher's; students fp32
        "autocast": "bf16" if autocast_dtype("auto", opts.device) else "fp32",
        "student_precision": "fp32",
        "checkpoint_dir": os.path.abspath(opts.checkpoint_dir),
        "batch_size": opts.batch_size,
        "linear_probe": {
            "standardized": True,
            "val_fraction": metrics.VAL_FRACTION,
            "fixed_C": opts.linear_probe_C,
        },
        "knn": {"k": metrics.KNN_K, "temperature": metrics.KNN_TEMPERATURE},
        "low_shot": {"fractions": list(metrics.LOW_SHOT_FRACTIONS), "seed": metrics.LOW_SHOT_SEED},
        "probes": {p.key: p.note for p in metrics.PROBES.values()},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds_total": seconds,
        "seconds_data_and_teacher_features": shared_seconds,
    }


def table_columns(entries: List[Dict[str, Any]]) -> List[report.Column]:
    """name, epoch, weights, a column per probe that ran for some entry (and its detail), the
    diagnostics."""
    d = lambda key: (lambda e: e["diagnostics"][key])  # noqa: E731
    columns: List[report.Column] = [("name", "name", "s"), ("epoch", "epoch", "d"),
                                    ("weights", weights_label, "s")]
    for p in metrics.PROBES.values():
        if any(e.get(p.key) is not None for e in entries):
            columns += [(p.title, p.key, ".2f")] + ([p.detail] if p.detail else [])
    return columns + [("pairwise cos", d("pairwise_cos"), ".3f"),
                      ("collapsed (legacy cos)", d("collapsed_legacy_cos"), ""),
                      ("collapsed", d("collapsed"), ""), ("feature std", d("feature_std"), ".4f"),
                      ("eff. rank", d("effective_rank"), ".1f"),
                      ("spread", lambda e: e["diagnostics"].get("relative_spread"), ".1e"),
                      ("cos(Ps,t)", d("student_teacher_cos"), ".3f"),
                      ("CKA(s,t)", d("cka_teacher"), ".3f"), ("seconds", "seconds", ".1f")]


def plot(entries: List[Dict[str, Any]], checkpoint_dir: str, reference: Config):
    """Accuracy vs epoch with the baselines (a random teacher named so), chance and collapsed
    checkpoints marked; below it the training loss from log.jsonl, named. A matplotlib Figure."""
    points = sorted(
        (e["epoch"], e["linear_acc"], e["knn_acc"]) for e in entries if e["kind"] == "checkpoint"
    )
    series = {"student linear probe": [p[:2] for p in points],
              f"student {metrics.KNN_K}-NN": [(p[0], p[2]) for p in points]}
    baselines = {}
    for e in entries:
        if e["kind"] != "checkpoint":
            name = f"{e['name']} (random init)" if e.get("random_init") else e["name"]
            baselines.update({f"{name} linear probe": e["linear_acc"],
                              f"{name} {metrics.KNN_K}-NN": e["knn_acc"]})
    collapsed = [(e["epoch"], e["linear_acc"]) for e in entries
                 if e["kind"] == "checkpoint" and e["diagnostics"]["collapsed"]]
    # the data folder's name only: the full path is in the JSON and markdown files
    d = reference.data
    title = (
        f"{os.path.basename(os.path.abspath(checkpoint_dir))}: {d.dataset_name} "
        f"{os.path.basename(os.path.normpath(d.dataset_root))}, {entries[0]['num_classes']} classes"
    )
    losses = {"training loss": report.loss_curve(checkpoint_dir)}
    terms = distill_loss.term_names(reference.train)
    if len(terms) > 1:  # one term is the total again
        losses.update({f"term {n}": report.loss_curve(checkpoint_dir, f"loss_{n}") for n in terms})
    return report.plot_figure(series, baselines, losses, title,
                              chance=100.0 / entries[0]["num_classes"], collapsed=collapsed,
                              loss_name=distill_loss.describe(reference.train))


def write_outputs(
    entries: List[Dict[str, Any]], header: Dict[str, Any], opts: Options, reference: Config
) -> str:
    """The JSON (--output_file), predictions (same stem with _predictions.npz), markdown (.md) and
    plot (.png) files; returns the markdown."""
    columns = table_columns(entries)
    markdown = (
        "\n".join([
            f"# Evaluation of {header['checkpoint_dir']}",
            "",
            (
                f"{header['device_name']} ({header['device']}, students fp32, teacher"
                f" {header['autocast']}), torch {header['torch']}, timm {header['timm']}, git"
                f" {header['git_sha'][:12]}, {header['created']}; data: {entries[0]['data']}"
            ),
            "",
            report.probe_note(key for _, key, _ in columns if key in metrics.PROBES),
            "",
            report.markdown_table(entries, columns),
        ])
        + "\n"
    )
    png = report.png_bytes(plot(entries, opts.checkpoint_dir, reference))
    save_predictions(predictions_path(opts.output_file), entries)
    json_entries = [{k: v for k, v in e.items() if k not in IN_MEMORY} for e in entries]
    report.write_files(opts.output_file, {"header": header, "entries": json_entries}, markdown, png)
    return markdown


def predictions_path(results_file: str) -> str:
    """eval_results.json -> eval_predictions.npz; other names -> <stem>_predictions.npz."""
    folder, name = os.path.split(results_file)
    stem = os.path.splitext(name)[0]
    stem = stem[:-len("_results")] if stem.endswith("_results") else stem
    return os.path.join(folder, f"{stem}_predictions.npz")


def save_predictions(path: str, entries: List[Dict[str, Any]]) -> None:
    """One int16 array per (entry, probe) under '<entry name>/<accuracy key>', the test labels and
    the test_id; whole or absent (atomic_write)."""
    first = entries[0]
    same = [e for e in entries if e.get("test_id") == first.get("test_id") and e.get("predictions")]
    for e in entries:
        if e not in same:
            note(
                f"{e['name']} was probed on other test images than {first['name']}: its predictions"
                " are not saved"
            )
    if not same:
        return
    arrays = {f"{e['name']}/{key}": value for e in same for key, value in e["predictions"].items()}
    arrays.update(labels=first["test_labels"], test_id=np.array(first["test_id"]))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_predictions(results_file: str) -> Optional[Dict[str, Any]]:
    """{'labels', 'test_id', 'predictions': {entry name: {accuracy key: int16 array}}} saved beside
    `results_file`, or None for results written before predictions were saved (or a file that cannot
    be read)."""
    path = predictions_path(results_file)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        note(f"{path} cannot be read ({e}); contrasts that need it are skipped")
        return None
    out = {"labels": arrays.pop("labels"), "test_id": str(arrays.pop("test_id")), "predictions": {}}
    for key, value in arrays.items():
        name, probe_key = key.rsplit("/", 1)
        out["predictions"].setdefault(name, {})[probe_key] = value
    return out


def log_to_run(entries: List[Dict[str, Any]], header: Dict[str, Any], markdown: str,
               opts: Options) -> None:
    """The entries' numbers and the table to the run's loggers: checkpoints as eval/* against their
    epoch, baselines as eval/<name>/* (one point)."""
    from loggers import flat_scalars, open_loggers
    columns = table_columns(entries)
    rows = [[get(e) if callable(get) else e[get] for _, get, _ in columns] for e in entries]
    with open_loggers(opts.loggers, opts.checkpoint_dir, {"eval": header}, job="eval") as live:
        for e in entries:
            values = {k: v for k, v in e.items()
                      if k not in ("epoch", "seconds", "num_classes", "dim")}
            prefix = "eval/" if e["kind"] == "checkpoint" else f"eval/{e['name']}/"
            live.scalars(flat_scalars(values, prefix), e["epoch"] or 0, axis="eval_epoch")
        live.table("eval/table", [title for title, _, _ in columns], rows, markdown)


# ----------------------------------------------------------------- main
def evaluate_run(opts: Options) -> List[Dict[str, Any]]:
    """Evaluates a run directory and writes the JSON/markdown/PNG results; returns the JSON entries.

    Raises UserError (one line) on bad input and NothingEvaluated (a UserError) when checkpoints
    exist but none could be evaluated.
    """
    started = time.time()
    shared = Shared(opts)
    entries, reference = checkpoint_entries(opts, shared)
    baselines = [
        (opts.eval_teacher, lambda: evaluate_teacher(reference, opts, shared)),
        (opts.eval_teacher, lambda: evaluate_teacher(reference, opts, shared, direct=True)),
        (opts.eval_untrained, lambda: evaluate_untrained(reference, opts, shared)),
    ]
    for wanted, evaluate in baselines:
        if wanted:
            entries.append(evaluate())
            print(summary_line(entries[-1]), flush=True)
    header = run_header(opts, time.time() - started, shared.seconds)
    markdown = write_outputs(entries, header, opts, reference)
    if opts.loggers:
        log_to_run(entries, header, markdown, opts)
    print("\n" + markdown, flush=True)
    print(f"wrote {opts.output_file} (+ .md, .png) in {time.time() - started:.1f} s", flush=True)
    return entries


@one_line_warnings()
def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings("ignore", message=".*xFormers.*")
    try:
        evaluate_run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
