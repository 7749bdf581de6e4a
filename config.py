"""Configuration: the three YAML files as dataclasses, validated once at load.

Every mistake a user can make here (unknown key, wrong type, impossible value, YAML syntax) raises a
`ConfigError` whose message is one line naming the file, the key and what is accepted. Entry scripts
turn any `UserError` into that line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import re
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, no network). Printed as one line, exit
    code 2."""


class ConfigError(UserError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose flag mistakes are one `error:` line and exit 2, like every other user
    mistake."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")

    def add_override(self, help: str = "") -> None:
        """--override SECTION.KEY=VALUE ..., the same flag in every entry script."""
        self.add_argument("--override", nargs="+", action="extend", default=[],
                          metavar="SECTION.KEY=VALUE", help=help or None)


def did_you_mean(word, choices, prefix: str = " (", suffix: str = ")") -> str:
    """" (did you mean 'batch_size'?)" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"{prefix}did you mean '{close[0]}'?{suffix}" if close else ""


@dataclass
class DataConfig:
    # cifar10 | cifar100 | imagefolder | folder (unlabelled: distill only)
    dataset_name: str = "cifar10"
    # torchvision root (holds cifar-10-batches-py) or imagefolder root (train/, test/)
    dataset_root: str = "./data"
    # torchvision download; compute nodes are often offline: download on a login node first
    download: bool = True
    # class-stratified seeded subset of N train images (null = all); test capped too
    max_samples: Optional[int] = None
    image_size: int = 96  # student input size in px; must equal model.student_img_size
    # threads used to decode images into the tensor cache (once) and by the evaluator
    num_workers: int = 4
    cache_dir: Optional[str] = None  # uint8 tensor cache; null = <dataset_root>/.tensor_cache
    # folder only: px each image is stored at (null = native size, all equal)
    source_size: Optional[int] = None


@dataclass
class TrainConfig:
    batch_size: int = 64  # per GPU; global batch = batch_size x world size
    num_epochs: int = 50
    learning_rate: float = 5e-4  # peak AdamW lr (absolute, not scaled with batch size)
    weight_decay: float = 0.04
    warmup_epochs: float = 10  # linear warmup from 0 to learning_rate, per step
    min_lr: float = 1e-6  # end of the cosine decay
    distill_loss_weights: Dict[str, float] = field(
        default_factory=lambda: {"cls": 1.0, "patch": 0.5}
    )
    # Distance between adapted student and teacher tokens: cosine (1 - cos) | mse | smooth_l1 |
    # a weighted mix, e.g. {cosine: 0.9, smooth_l1: 0.1} (AM-RADIO); for CLS and patch terms alike.
    distill_loss: Union[str, Dict[str, float]] = "cosine"
    # Distill only: + ce_weight x cross-entropy of a linear head on the labels (uses labels).
    ce_weight: float = 0.0
    use_minimal_aug: bool = False  # resize + flip only (no random resized crop, no blur)
    # probability of a Gaussian blur on the student/teacher view (the legacy optional blur)
    blur_prob: float = 0.0
    # distill | supervised (linear head + cross-entropy on labels, no teacher)
    objective: str = "distill"
    seed: int = 0  # rank r uses seed + r for augmentation
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    # torch.compile the student and the teacher forward (CUDA): false | true (= default) | a mode
    compile: Union[str, bool] = False
    cuda_graphs: Union[str, bool] = "auto"  # auto (on for single-process CUDA runs) | true | false
    checkpoint_dir: str = "./checkpoints/kd"
    # epochs completed, 1-based
    save_epochs: List[int] = field(default_factory=lambda: [1, 10, 20, 50])
    save_every: int = 0  # also write checkpoint_latest.pth every N steps (0 = off)
    # cap steps per epoch (null = full epochs); for smoke runs
    max_steps_per_epoch: Optional[int] = None
    # end this invocation after N epochs (the schedule spans num_epochs)
    stop_after_epoch: Optional[int] = None
    log_every: int = 50  # steps between loss read-backs (host syncs) for the progress bar
    progress: bool = True  # tqdm bar (shown only on a TTY, rank 0)
    diag_batch_size: int = 256  # fixed held-out test batch for per-epoch collapse diagnostics
    # precompute teacher targets for K seeded views per image (bench.py (d))
    cache_teacher_features: bool = False
    teacher_cache_views: int = 8  # K views per image in the teacher cache
    ema_decay: Optional[float] = None  # student EMA per optimizer step, e.g. 0.999; null = off
    loggers: List[str] = field(default_factory=list)  # beside log.jsonl: tensorboard, wandb


@dataclass
class ModelConfig:
    teacher_name: str = "dinov2_vitb14"  # dinov2_vit{s,b,l,g}14[_reg] or any timm model name
    teacher_img_size: int = 224  # teacher input px; must be a multiple of the teacher patch size
    teacher_pretrained: bool = True  # false = random init: only for tests and offline smoke runs
    # local .pth/.safetensors/trainer checkpoint; overrides the download
    teacher_weights: Optional[str] = None
    teacher_source: str = "timm"  # timm | hub (torch.hub facebookresearch/dinov2)
    # extra timm.create_model kwargs (tiny tests)
    teacher_kwargs: Dict[str, Any] = field(default_factory=dict)
    student_name: str = "vit_small_patch16_224"
    student_img_size: int = 96  # 96 px with patch 16 -> 6x6 grid
    student_kwargs: Dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.0
    # student feature for the probe: CLS (true) or mean of patch tokens (false)
    use_cls_token: bool = True
    # Student->teacher adapter: frozen (fixed random semi-orthogonal linear map) | learned (linear,
    # trained) | mlp (LayerNorm -> Linear -> GELU -> Linear, trained). Saved in checkpoints, not
    # part of the probed student.
    projection: str = "frozen"
    projection_hidden_dim: Optional[int] = None  # mlp hidden width (null = teacher target width)
    projection_heads: str = "separate"  # separate adapters for CLS and patch tokens | shared
    # Teacher blocks the targets come from: [-1] the last; [-2, -1] the last two, each through the
    # final norm (as the last block's), combined per token by teacher_blocks_combine:
    # concat (width x N) | mean.
    teacher_blocks: List[int] = field(default_factory=lambda: [-1])
    teacher_blocks_combine: str = "concat"
    projection_seed: int = 0
    # none | center | standardize teacher targets with train-set statistics
    target_norm: str = "none"


# train.loggers: optional packages (pip install tensorboard wandb); loggers.py starts them.
LOGGER_NAMES = ("tensorboard", "wandb")
SECTIONS = {"data": DataConfig, "train": TrainConfig, "model": ModelConfig}
DEFAULT_FILES = {
    "data": "data_config.yaml",
    "train": "train_config_kd.yaml",
    "model": "model_config_kd.yaml",
}

CHOICES = {
    ("data", "dataset_name"): ("cifar10", "cifar100", "imagefolder", "folder"),
    ("train", "objective"): ("distill", "supervised"),
    ("train", "device"): ("auto", "cuda", "cpu"),
    ("train", "precision"): ("auto", "bf16", "fp32"),
    ("train", "cuda_graphs"): ("auto", True, False),
    ("train", "compile"): (False, True, "default", "max-autotune-no-cudagraphs", "reduce-overhead",
                           "max-autotune"),
    ("model", "teacher_source"): ("timm", "hub"),
    ("model", "projection"): ("frozen", "learned", "mlp"),
    ("model", "projection_heads"): ("separate", "shared"),
    ("model", "teacher_blocks_combine"): ("concat", "mean"),
    ("model", "target_norm"): ("none", "center", "standardize"),
}

POSITIVE = {
    ("data", "image_size"),
    ("data", "max_samples"),
    ("train", "batch_size"),
    ("train", "num_epochs"),
    ("train", "learning_rate"),
    ("train", "log_every"),
    ("train", "diag_batch_size"),
    ("train", "max_steps_per_epoch"),
    ("train", "stop_after_epoch"),
    ("train", "teacher_cache_views"),
    ("model", "teacher_img_size"),
    ("model", "student_img_size"),
    ("model", "projection_hidden_dim"),
    ("data", "source_size"),
}
NON_NEGATIVE = {
    ("data", "num_workers"),
    ("train", "weight_decay"),
    ("train", "warmup_epochs"),
    ("train", "min_lr"),
    ("train", "save_every"),
    ("model", "drop_path_rate"),
    ("train", "ce_weight"),
}
# Names train.distill_loss accepts. distill_loss.py's distances are listed here so a config is
# checked without importing torch (a test checks the two agree); register_distance adds others.
BUILTIN_DISTILL_LOSSES = frozenset({"cosine", "mse", "smooth_l1"})
DISTILL_LOSSES = set(BUILTIN_DISTILL_LOSSES)
# Stored expanded (~) and absolute: config.yaml and checkpoints then mean the same files from any
# directory.
PATH_KEYS = {
    ("data", "dataset_root"),
    ("data", "cache_dir"),
    ("train", "checkpoint_dir"),
    ("model", "teacher_weights"),
}
KWARGS_KEYS = {("model", "teacher_kwargs"), ("model", "student_kwargs")}
# Keys that change nothing in what is trained: where and how fast it runs, what is shown, which
# files are kept. A resume accepts other values for these (log.jsonl notes them), and
# run_experiments.py reuses a finished arm.
HARMLESS_KEYS = frozenset({
    "data.download", "data.num_workers", "data.cache_dir", "train.device", "train.compile",
    "train.cuda_graphs", "train.checkpoint_dir", "train.save_epochs", "train.save_every",
    "train.stop_after_epoch", "train.log_every", "train.progress", "train.diag_batch_size",
    "train.loggers",
})
# PyYAML (YAML 1.1) reads 1e-3 as a string; a float there needs a dot and a signed exponent
# (1.0e-3).
SCIENTIFIC_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class Config:
    data: DataConfig
    train: TrainConfig
    model: ModelConfig

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        return " or ".join([_type_name(a) for a in args] + (["null"] if nullable else []))
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _check_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, List):
        return isinstance(value, list) and all(
            _check_type(v, typing.get_args(tp)[0]) for v in value
        )
    if origin in (dict, Dict):
        key_tp, val_tp = typing.get_args(tp)
        return isinstance(value, dict) and all(
            _check_type(k, key_tp) and _check_type(v, val_tp) for k, v in value.items())
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def read_yaml(path: str) -> Dict[str, Any]:
    """Reads a YAML mapping; a missing file, a syntax error or a non-mapping is one ConfigError
    line."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found; pass an existing file (the repo ships "
                          f"{', '.join(DEFAULT_FILES.values())})")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        what = ("a zip archive (a checkpoint?)" if data.startswith(b"PK\x03\x04") else
                f"not UTF-8 text (byte 0x{data[e.start]:02x} on line {line})")
        raise ConfigError(
            f"{path}: {what}; a config file is YAML text: pass a .yaml file, saved as UTF-8"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}; fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
    return raw


def build_section(section: str, values: Dict[str, Any], source: str):
    """Builds one section's dataclass from a dict, checking keys, types and values. `source` names
    the origin."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            hint = did_you_mean(key, hints) or f"; accepted keys: {', '.join(hints)}"
            raise ConfigError(f"{source}: unknown key '{section}.{key}'{hint}")
        value = values[key] = _scientific_floats(value, hints[key])
        if not _check_type(value, hints[key]):
            raise ConfigError(
                f"{source}: key '{section}.{key}' must be {_type_name(hints[key])}, got {value!r}"
            )
        if hints[key] is float and isinstance(value, int):
            values[key] = float(value)
        if (section, key) in PATH_KEYS and isinstance(value, str):
            values[key] = expand_path(value)
        _check_value(section, key, values[key], source)
    return cls(**values)


def expand_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _scientific_floats(value: Any, tp: Any) -> Any:
    """'1e-3' -> 0.001 where `tp` takes a number (float keys; values of mappings of numbers or of
    timm kwargs)."""
    if isinstance(value, dict) and typing.get_origin(tp) is Union:  # train.distill_loss: a mix
        tp = next((a for a in typing.get_args(tp) if typing.get_origin(a) in (dict, Dict)), tp)
    if isinstance(value, dict) and typing.get_origin(tp) in (dict, Dict):
        return {k: _scientific_floats(v, typing.get_args(tp)[1]) for k, v in value.items()}
    takes_float = tp in (float, Any) or (
        typing.get_origin(tp) is Union and float in typing.get_args(tp)
    )
    if takes_float and isinstance(value, str) and SCIENTIFIC_RE.fullmatch(value.strip()):
        return float(value)
    return value


SEED_KEYS = {("train", "seed"), ("model", "projection_seed")}
# Seeds are multiplied and offset (views, ranks): they must stay inside torch's 64-bit seeds.
SEED_MAX = 2 ** 32 - 1
# Rates that are probabilities of dropping: 1 would drop everything (drop path divides by 1 - rate).
RATE_KEYS = {("model", "drop_path_rate")}
RATE_KWARGS = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
               "drop_path_rate")


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def _check_value(section: str, key: str, value: Any, source: str) -> None:
    name = f"'{section}.{key}'"
    if _non_finite(value):
        raise ConfigError(f"{source}: key {name} must be a finite number, got {value!r}; NaN and "
                          f"inf are not settings (YAML reads .nan and .inf as such)")
    if (section, key) in SEED_KEYS and value is not None and not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{source}: key {name} must be in 0..{SEED_MAX}, got {value!r}")
    if (section, key) in RATE_KEYS and value is not None and not 0 <= value < 1:
        raise ConfigError(f"{source}: key {name} is a probability and must be in [0, 1), got "
                          f"{value!r}")
    if (section, key) in KWARGS_KEYS and isinstance(value, dict):
        for k, v in value.items():
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if k in RATE_KWARGS and number and not 0 <= v < 1:
                raise ConfigError(f"{source}: key {name} has {k}={v!r}; a drop rate is a "
                                  f"probability and must be in [0, 1)")
    if (section, key) in CHOICES and value not in CHOICES[(section, key)]:
        # true, not True
        accepted = ", ".join(yaml.safe_dump(c).split("\n")[0] for c in CHOICES[(section, key)])
        raise ConfigError(f"{source}: key {name} must be one of {accepted}, got {value!r}")
    if value is None:
        return
    if (section, key) in POSITIVE and value <= 0:
        raise ConfigError(f"{source}: key {name} must be > 0, got {value!r}")
    if (section, key) in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{source}: key {name} must be >= 0, got {value!r}")
    if key == "distill_loss_weights":
        if set(value) != {"cls", "patch"} or any(v < 0 for v in value.values()):
            raise ConfigError(
                f"{source}: key {name} must be {{cls: W, patch: W}} with W >= 0, got {value!r}"
            )
    if key == "distill_loss":
        mix = {value: 1.0} if isinstance(value, str) else value
        unknown = [str(n) for n in mix if n not in DISTILL_LOSSES]
        if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            what = (f"unknown distance {', '.join(map(repr, unknown))}" if unknown
                    else f"got {value!r}")
            raise ConfigError(f"{source}: key {name}: {what}; use one of "
                              f"{', '.join(sorted(DISTILL_LOSSES))} or a mix of them with weights "
                              f">= 0 (not all 0), e.g. {{cosine: 0.9, smooth_l1: 0.1}}")
    if key == "teacher_blocks" and (not value or len(set(value)) != len(value)):
        raise ConfigError(f"{source}: key {name} must be a non-empty list of distinct block "
                          f"indices (-1 = last block, -2 the one before), got {value!r}; e.g. "
                          f"[-1] or [-2, -1]")
    if key == "save_epochs" and any(e < 1 for e in value):
        raise ConfigError(
            f"{source}: key {name} holds epochs completed (1-based), all must be >= 1, got"
            f" {value!r}"
        )
    if key in ("diag_batch_size", "max_samples") and value < 2:
        raise ConfigError(
            f"{source}: key {name} must be >= 2 (pairwise statistics need two images), got"
            f" {value!r}"
        )
    if key == "ema_decay" and not 0 < value < 1:
        raise ConfigError(f"{source}: key {name} must be in (0, 1) (e.g. 0.999) or null for no "
                          f"EMA, got {value!r}")
    if key == "loggers" and (set(value) - set(LOGGER_NAMES) or len(set(value)) < len(value)):
        bad = [v for v in value if v not in LOGGER_NAMES]
        close = difflib.get_close_matches(bad[0], LOGGER_NAMES, n=1) if bad else []
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: key {name} must be a list of distinct names from "
                          f"{', '.join(LOGGER_NAMES)}, got {value!r}{hint}")
    if key == "blur_prob" and not 0 <= value <= 1:
        raise ConfigError(f"{source}: key {name} must be in [0, 1], got {value!r}")
    if (section, key) in KWARGS_KEYS and None in value.values():
        # timm drops None kwargs, so {embed_dim:32} (YAML: key 'embed_dim:32', no value) would build
        # the full model.
        empty = [str(k) for k, v in value.items() if v is None]
        spaced = ", ".join(k.replace(":", ": ", 1) if ":" in k else f"{k}: VALUE" for k in empty)
        raise ConfigError(
            f"{source}: key {name} has no value for {', '.join(map(repr, empty))}; YAML needs a"
            f" space after each colon ({{{spaced}}}); remove a key to get timm's default"
        )


def parse_override(text: str) -> tuple:
    """'train.num_epochs=3' -> ('train', 'num_epochs', 3); VALUE is parsed as YAML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(
            f"--override {text!r}: expected SECTION.KEY=VALUE with SECTION one of data, train,"
            " model"
        )
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(
            f"--override {text!r}: unknown section '{section}'; use data, train or model"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(
            f"--override {text!r}: VALUE is not valid YAML; quote strings, e.g. model.x='a b'"
        ) from None
    return section, key, value


def load_config(
    data_path: str, train_path: str, model_path: str, overrides: Optional[List[str]] = None
) -> Config:
    """Reads, overrides and validates the three YAML files. Raises ConfigError with one line on any
    mistake."""
    paths = {"data": data_path, "train": train_path, "model": model_path}
    raw = {section: read_yaml(path) for section, path in paths.items()}
    sources = {section: {key: paths[section] for key in values} for section, values in raw.items()}
    for text in overrides or []:
        section, key, value = parse_override(text)
        raw[section][key] = value
        sources[section][key] = f"--override {text}"
    sections = {}
    for section, values in raw.items():
        # Validate key by key so an error names the file (or override) that holds the bad key.
        for key in list(values):
            build_section(section, {key: values[key]}, sources[section][key])
        sections[section] = build_section(section, dict(values), paths[section])
    config = Config(**sections)
    check_consistency(
        config,
        {
            **paths,
            **{
                f"{section}.{key}": source
                for section, keys in sources.items()
                for key, source in keys.items()
            },
        },
    )
    return config


def replace_values(cfg: Config, values: Dict[str, Dict[str, Any]], source: str) -> Config:
    """A new Config: `values` ({section: {key: value}}) replace cfg's, checked as if read from the
    file `source`.

    How in-process callers (run_experiments.py, bench.py) derive a run's config: no YAML text round
    trip.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections data, train, model")
    merged = cfg.to_dict()
    for section, section_values in values.items():
        if section not in SECTIONS or not isinstance(section_values, dict):
            raise ConfigError(
                f"{source}: top-level keys must be sections data, train, model with mappings, got "
                f"'{section}'"
            )
        build_section(section, dict(section_values), source)  # names `source` for a bad key
        merged[section].update(section_values)
    config = Config(**{s: build_section(s, merged[s], source) for s in SECTIONS})
    check_consistency(config, {s: source for s in SECTIONS})
    return config


def apply_overrides(cfg: Config, overrides: List[str]) -> Config:
    """cfg with command-line `SECTION.KEY=VALUE` strings applied (later ones win), each checked and
    named on error."""
    values: Dict[str, Dict[str, Any]] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        build_section(section, {key: value}, f"--override {text}")
        values.setdefault(section, {})[key] = value
    return replace_values(cfg, values, "--override " + " ".join(overrides))


def dotted(values: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """{'train.batch_size': 8} -> {'train': {'batch_size': 8}}, for replace_values."""
    out: Dict[str, Dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def config_from_dict(d: Dict[str, Dict[str, Any]], source: str) -> Config:
    """Rebuilds a Config from the plain dicts stored in a checkpoint (keys unknown to this version
    are an error)."""
    if not isinstance(d, dict) or set(d) - set(SECTIONS):
        raise ConfigError(
            f"{source}: stored config must be a mapping with sections data, train, model"
        )
    sections = {s: dict(d.get(s) or {}) for s in SECTIONS}
    for section, key in KWARGS_KEYS:
        # Written before null kwargs were refused: timm dropped them, so the trained model is the
        # one without them.
        if isinstance(sections[section].get(key), dict):
            sections[section][key] = {
                k: v for k, v in sections[section][key].items() if v is not None
            }
    return Config(**{s: build_section(s, sections[s], f"{source} [{s}]") for s in SECTIONS})


def check_consistency(config: Config, sources: Dict[str, str]) -> None:
    """Checks across keys; `sources` maps 'section.key' (or, for keys not listed, 'section') to
    where it was set."""
    def src(dotted_key: str) -> str:
        return sources.get(dotted_key) or sources[dotted_key.split(".")[0]]

    t, m, d = config.train, config.model, config.data
    if any(e > t.num_epochs for e in t.save_epochs):
        bad = [e for e in t.save_epochs if e > t.num_epochs]
        fix = sorted({e for e in t.save_epochs if e <= t.num_epochs} | {t.num_epochs})
        epochs_from = (
            ""
            if src("train.num_epochs") == src("train.save_epochs")
            else f" ({src('train.num_epochs')})"
        )
        raise ConfigError(
            f"{src('train.save_epochs')}: key 'train.save_epochs' has {bad} beyond "
            f"train.num_epochs={t.num_epochs}{epochs_from}; drop them or raise num_epochs, e.g. "
            f"--override train.save_epochs=[{','.join(map(str, fix))}]"
        )
    if t.min_lr > t.learning_rate:
        raise ConfigError(f"{src('train.min_lr')}: key 'train.min_lr'={t.min_lr} exceeds "
                          f"train.learning_rate={t.learning_rate} ({src('train.learning_rate')})")
    if d.image_size != m.student_img_size:
        raise ConfigError(
            f"{src('data.image_size')}: key 'data.image_size'={d.image_size} must equal "
            f"model.student_img_size={m.student_img_size} ({src('model.student_img_size')})"
        )
    if d.dataset_name == "folder" and t.objective == "supervised":
        raise ConfigError(
            f"{src('data.dataset_name')}: key 'data.dataset_name'=folder has no labels; "
            f"train.objective=supervised ({src('train.objective')}) needs cifar10, cifar100 or "
            "imagefolder (folder is for distillation only)"
        )
    if t.ce_weight > 0 and (t.objective != "distill" or d.dataset_name == "folder"):
        why = ("folder has no labels" if d.dataset_name == "folder" else
               "the supervised objective is cross-entropy already")
        raise ConfigError(f"{src('train.ce_weight')}: key 'train.ce_weight'={t.ce_weight} adds "
                          f"cross-entropy to distillation, but {why}; set train.ce_weight=0")
    if m.projection_hidden_dim is not None and m.projection != "mlp":
        raise ConfigError(f"{src('model.projection_hidden_dim')}: key "
                          f"'model.projection_hidden_dim' is the mlp adapter's width, "
                          f"model.projection={m.projection} ({src('model.projection')}); set it "
                          f"to null or use projection: mlp")
    if d.source_size is not None and d.dataset_name != "folder":
        raise ConfigError(
            f"{src('data.source_size')}: key 'data.source_size' applies to dataset_name: folder"
            f" only, got dataset_name={d.dataset_name}; set it to null"
        )


def config_changes(stored: Dict[str, Dict[str, Any]], requested: Dict[str, Dict[str, Any]]
                   ) -> Tuple[Dict[str, Tuple[Any, Any]], Dict[str, Tuple[Any, Any]]]:
    """What differs between a stored config (a checkpoint's) and the requested one, {'section.key':
    (stored, now)}: (keys that change what is trained, HARMLESS_KEYS). A key an older checkpoint
    lacks counts as its default, the behaviour of the code that wrote it; a stored key this version
    does not know is left out."""
    result, harmless = {}, {}
    for section, cls in SECTIONS.items():
        defaults = dataclasses.asdict(cls())
        old = {**defaults, **(stored.get(section) or {})}
        for key, now in requested.get(section, {}).items():
            before = old.get(key)
            if (section, key) in PATH_KEYS and isinstance(before, str):
                before = expand_path(before)  # older checkpoints stored relative paths, as typed
            if before != now:
                dotted_key = f"{section}.{key}"
                (harmless if dotted_key in HARMLESS_KEYS else result)[dotted_key] = (before, now)
    return result, harmless


@contextlib.contextmanager
def one_line_warnings():
    """Python warnings print as one `warning: MESSAGE` line, like the scripts' own notes (not
    file:line, category and the source line of the warn call); the previous format is restored on
    exit."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: (
        "warning: " + " ".join(str(message).split()) + "\n")
    try:
        yield
    finally:
        warnings.formatwarning = previous
