"""Test helpers: a synthetic, learnable image-folder dataset, tiny model overrides, config
loading."""
from __future__ import annotations

import os

import numpy as np
import yaml
from PIL import Image

from config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = tuple(os.path.join(REPO, f) for f in ("data_config.yaml", "train_config_kd.yaml",
                                                     "model_config_kd.yaml"))
CLASSES = ("circle", "hstripes", "vstripes", "checker")
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}


def class_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A 32x32 RGB image whose class is visible in its spatial pattern and colour, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    phase = rng.integers(0, 8)
    if label == 0:
        pattern = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2).astype(float)
    elif label == 1:
        pattern = ((yy + phase) // 4 % 2).astype(float)
    elif label == 2:
        pattern = ((xx + phase) // 4 % 2).astype(float)
    else:
        pattern = (((yy + phase) // 4 + (xx + phase) // 4) % 2).astype(float)
    colour = np.eye(3)[label % 3] * 0.6 + 0.2
    img = pattern[..., None] * colour[None, None] * 255 + rng.normal(0, 20, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_imagefolder(
    root, train_per_class: int = 24, test_per_class: int = 8, seed: int = 0
) -> str:
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                Image.fromarray(class_image(label, rng)).save(os.path.join(folder, f"{i:04d}.png"))
    return str(root)


def symlinked_checkout(folder) -> str:
    """A folder that looks like a checkout to commands run in it (`python distill_trainer.py`, the
    sbatch scripts' relative paths, `checkpoints/...`), their output staying there: the entry
    scripts, configs and scripts/ are symlinks to the repo's. Python puts a symlinked script's real
    folder (the repo) on sys.path."""
    os.makedirs(folder)
    for name in os.listdir(REPO):
        if name.endswith((".py", ".yaml")) or name in ("configs", "scripts"):
            os.symlink(os.path.join(REPO, name), os.path.join(folder, name))
    return str(folder)


def tiny_overrides(data_root: str, run_dir: str, **extra) -> list:
    """Overrides that turn the default configs into a seconds-long CPU run with tiny random
    models."""
    values = {
        "data.dataset_name": "imagefolder",
        "data.dataset_root": data_root,
        "data.image_size": 24,
        "data.num_workers": 0,
        "data.download": False,
        "model.teacher_name": "vit_small_patch14_dinov2",
        "model.teacher_pretrained": False,
        "model.teacher_img_size": 32,
        "model.teacher_kwargs": TINY_VIT,
        "model.student_img_size": 24,
        "model.student_kwargs": TINY_VIT,
        "train.batch_size": 16,
        "train.num_epochs": 2,
        "train.save_epochs": [1, 2],
        "train.warmup_epochs": 1,
        "train.device": "cpu",
        "train.checkpoint_dir": run_dir,
        "train.progress": False,
        "train.diag_batch_size": 16,
        "train.log_every": 1,
    }
    values.update(extra)
    # A string is passed as typed on a command line (YAML text, e.g. "1.0e+30"); other values are
    # encoded.
    return [f"{k}={v}" if isinstance(v, str) else override_text(k, v) for k, v in values.items()]


def tiny_config(data_root: str, run_dir: str, **extra):
    """The validated Config of a tiny run (the repo's three files plus tiny_overrides)."""
    return load_config(*CONFIG_FILES, tiny_overrides(data_root, run_dir, **extra))


def override_text(dotted_key: str, value) -> str:
    """'train.min_lr', 1e-6 -> 'train.min_lr=1.0e-06': VALUE written as a command line needs it for
    parse_override.

    json.dumps would write 1e-06, which YAML 1.1 reads as a string. A scalar document ends with an
    explicit end marker ("\n...\n"); a flow collection does not.
    """
    text = (
        yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
        .replace("\n...\n", "")
        .strip()
    )
    return f"{dotted_key}={text}"


# 400 images at batch 4: 100 steps in the one epoch, so a signal sent early (or after the first
# save) lands mid-epoch.
LONG_EPOCH = {"train.num_epochs": 1, "train.save_epochs": [1], "train.batch_size": 4,
              "train.diag_batch_size": 8, "train.log_every": 5}


def make_long_epoch_root(root):
    return make_imagefolder(root, train_per_class=100, test_per_class=4)
