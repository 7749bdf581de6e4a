"""Datasets as whole uint8 tensors, plus the per-epoch index plan shared by all ranks.

CIFAR at 32 px is 150 MB as uint8, so each split is held in memory as one `[N, 3, H, W]` tensor and
batches are plain index lookups (augmentation runs batched on the GPU, see transforms.py): no
DataLoader workers, no PIL per step. An image folder is decoded once into a tensor cache file keyed
by the source files, so later runs (and the other ranks) start in about a second. `dataset_name:
folder` reads every image below dataset_root, unlabelled, for distillation on another distribution
(a fixed seeded subset is held out as its "test" split for diagnostics).

    images, labels, classes = load_split(cfg.data, "train")
    for step_idx in epoch_indices(len(images), batch_size, world_size, rank, seed, epoch):
        batch = images[step_idx]
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision
from PIL import Image

try:
    from torchvision.io import ImageReadMode, decode_image
# deprecated since torchvision 0.29 and due for removal: PIL then decodes everything
except ImportError:
    decode_image = None

from checkpoint import WriteError, atomic_write, make_dirs, remove_empty_dirs
from config import DataConfig, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = ("train", "test")
CACHE_VERSION = 1  # bump when the cached layout changes so old files are not reused
SUBSET_SEED = 0  # max_samples subsets are the same for every run and every rank
STALE_TEMP_S = 600  # a cache temp file untouched this long belongs to a killed write
STALE_TEMP_RE = re.compile(r".+\.pt\.[^.]+\.tmp$")  # atomic_write's <cache>.pt.<random>.tmp
# torchvision's urlopen has no timeout; a stalled connection must not hang a job
DOWNLOAD_SOCKET_TIMEOUT_S = 60

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"],
                "test": ["test_batch", "batches.meta"]},
    "cifar100": {"train": ["train", "meta"], "test": ["test", "meta"]},
}

_warned_cache_dirs = set()

Split = Tuple[torch.Tensor, torch.Tensor, List[str]]


def load_split(data_cfg: DataConfig, split: str) -> Split:
    """Returns (images uint8 [N,3,H,W] contiguous CPU, labels int64 [N], classes) for split "train"
    or "test".

    Raises UserError (one line naming the path and the fix) for missing or unreadable data.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = data_cfg.dataset_name
    if name in CIFAR_FOLDERS:
        images, labels, classes = _load_cifar(data_cfg, split)
    elif name == "imagefolder":
        images, labels, classes = _load_imagefolder(data_cfg, split)
    elif name == "folder":
        images, labels, classes = _load_folder(data_cfg, split)
    else:
        raise UserError(
            f"data.dataset_name={name!r} is not supported; use cifar10, cifar100, imagefolder or"
            " folder"
        )
    if data_cfg.max_samples is not None and data_cfg.max_samples < len(labels):
        keep = stratified_subset(labels, data_cfg.max_samples, seed=SUBSET_SEED)
        images, labels = images[keep].contiguous(), labels[keep].contiguous()
    return images, labels, classes


# --------------------------------------------------------------------------------------------------
# CIFAR (torchvision's pickled batches)
# --------------------------------------------------------------------------------------------------

def _load_cifar(data_cfg: DataConfig, split: str) -> Split:
    name, root = data_cfg.dataset_name, os.path.abspath(os.path.expanduser(data_cfg.dataset_root))
    files = [os.path.join(root, CIFAR_FOLDERS[name], f) for f in CIFAR_FILES[name][split]]
    cache_path = None
    if all(os.path.isfile(f) for f in files):
        cache_path = _cache_path(data_cfg, f"{name}_{split}", _source_key(root, files))
        cached = _read_cache(cache_path)
        if cached is not None:
            return cached
    dataset = _torchvision_cifar(name, root, split, data_cfg.download)
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    result = (images, labels, list(dataset.classes))
    if cache_path is None:  # files were just downloaded: key them now
        cache_path = _cache_path(data_cfg, f"{name}_{split}", _source_key(root, files))
    _write_cache(cache_path, result, data_cfg)
    return result


def _torchvision_cifar(name: str, root: str, split: str, download: bool):
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = CIFAR_FOLDERS[name]
    advice = (
        f"{folder} must be under {root}; set data.download=true on a machine with network (e.g. a"
        " login node), or use dataset_name: imagefolder with the extracted JPEG tree"
    )
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    # torchvision would create it anyway: noted, to undo on failure
    created = make_dirs(root) if download else []
    try:
        return cls(root=root, train=split == "train", download=download)
    # URLError is an OSError; torchvision raises RuntimeError for missing files
    except (OSError, RuntimeError) as e:
        remove_empty_dirs(created)  # a failed download leaves no empty data folder behind
        what = "download failed" if download else "dataset not found or corrupted"
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"{name}: {what} ({reason}); {advice}") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


# --------------------------------------------------------------------------------------------------
# Image folder: <root>/<split>/<class>/<image>
# --------------------------------------------------------------------------------------------------

def _load_imagefolder(data_cfg: DataConfig, split: str) -> Split:
    root = os.path.abspath(os.path.expanduser(data_cfg.dataset_root))
    classes = _check_class_lists(root)
    split_dir = os.path.join(root, split)
    files, labels = _list_images(split_dir, classes)
    cache_path = _cache_path(data_cfg, f"imagefolder_{split}", _source_key(root, files))
    cached = _read_cache(cache_path)
    if cached is not None:
        return cached
    images = _decode_all(files, data_cfg.num_workers)
    result = (images, torch.as_tensor(labels, dtype=torch.int64), classes)
    _write_cache(cache_path, result, data_cfg)
    return result


def _class_folders(root: str, split: str) -> List[str]:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(
            f"{split_dir}: folder not found; an imagefolder dataset_root needs train/ and test/ "
            "folders, each with one sub-folder per class"
        )
    classes = sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )
    if not classes:
        raise UserError(
            f"{split_dir}: no class folders; put the images in {split_dir}/<class_name>/"
        )
    return classes


def _check_class_lists(root: str) -> List[str]:
    """Both splits must name the same classes, or label i would mean different things in train and
    test."""
    if not os.path.isdir(root):
        raise UserError(
            f"{root}: data.dataset_root not found; point it at a folder holding train/<class>/ and "
            "test/<class>/ image folders"
        )
    train, test = _class_folders(root, "train"), _class_folders(root, "test")
    if train != test:
        diff = sorted(set(train) ^ set(test))
        raise UserError(f"{root}: train/ and test/ class folders differ ({', '.join(diff[:5])}); "
                        f"both splits need the same class sub-folders")
    return train


def _list_images(split_dir: str, classes: Sequence[str]) -> Tuple[List[str], List[int]]:
    """Images directly in <split_dir>/<class>/; images further down and dangling links are skipped,
    one warning."""
    files, labels, nested, dangling = [], [], [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        found = []
        for e in os.scandir(class_dir):
            if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                found.append(e.path)
            elif e.is_symlink() and not os.path.exists(e.path):
                dangling.append(e.path)
            elif e.is_dir() and not e.name.startswith("."):
                nested += [os.path.join(d, f) for d, _, fs in os.walk(e.path) for f in fs
                           if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise UserError(
                f"{class_dir}: class folder has no images ({'/'.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder (from both train/ and test/)"
            )
        files += sorted(found)
        labels += [label] * len(found)
    if nested or dangling:
        parts = (
            [f"{len(nested)} images in sub-folders of class folders (e.g. {min(nested)})"]
            if nested
            else []
        )
        parts += [f"{len(dangling)} dangling symlinks (e.g. {min(dangling)})"] if dangling else []
        warnings.warn(f"{split_dir}: skipped {' and '.join(parts)}; only images directly in "
                      f"{os.path.basename(split_dir)}/<class>/ are read")
    return files, labels


def _decode_file(path: str) -> torch.Tensor:
    """One image as uint8 RGB [3, H, W], whatever its mode and bit depth: the one decoder of
    every image source.

    torchvision's decoder first (2x faster); it returns uint16 for 16-bit PNGs, kept to the high
    byte as PIL reads 16-bit RGB. PIL for the formats torchvision lacks (BMP) and the modes it
    refuses.
    """
    if decode_image is not None:
        try:
            with open(path, "rb") as f:
                data = f.read()
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=ImageReadMode.RGB)
            if img.dtype == torch.uint16:
                return (img.to(torch.int32) >> 8).to(torch.uint8)
            if img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3:
                return img
        except (RuntimeError, ValueError, OSError):
            pass
    try:
        with Image.open(path) as im:
            return _pil_rgb8(im)
    except Exception as e:
        reason = " ".join(str(e).split())[:120]
        raise UserError(f"{path}: cannot decode image ({type(e).__name__}: {reason}); "
                        f"replace or delete the file (or convert it to 8-bit RGB)") from None


# PIL modes wider than 8 bits; convert("RGB") would clip them at 255 instead of scaling them.
_PIL_16BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _pil_rgb8(im: "Image.Image") -> torch.Tensor:
    """uint8 [3, H, W] from a PIL image of any mode; 16-bit (and 32-bit integer) grey keeps its
    high byte."""
    if im.mode in _PIL_16BIT:
        # Mode I is how some PIL versions open 16-bit grey PNGs: its range is taken as 16 bits.
        grey = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(grey)).expand(3, *grey.shape).contiguous()
    if im.mode == "F":
        raise ValueError("32-bit float pixels have no fixed range")
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def _decode_chunk(paths: Sequence[str], size: Optional[int] = None) -> List[torch.Tensor]:
    return [_decode_file(p) if size is None else _square(_decode_file(p), size) for p in paths]


def _square(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, size, size]: shorter side resized to `size` (antialiased bilinear), then the centre
    crop."""
    h, w = img.shape[1:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        x = torch.nn.functional.interpolate(img[None].float(), size=(new_h, new_w), mode="bilinear",
                                            antialias=True, align_corners=False)[0]
        top, left = (new_h - size) // 2, (new_w - size) // 2
        img = x[:, top:top + size, left:left + size].round_().clamp_(0, 255).to(torch.uint8)
    return img.contiguous()


def _decode_all(
    files: Sequence[str],
    num_workers: int,
    size: Optional[int] = None,
    mixed_fix: str = "resize all images of the dataset to one size first",
) -> torch.Tensor:
    """All files as one uint8 [N, 3, H, W] tensor: at `size` x `size` px if given, else all must
    share a size."""
    # Chunks, not one task per file: for 32 px images the pool's per-task overhead exceeds the
    # decode itself.
    chunks = [files[i:i + 512] for i in range(0, len(files), 512)]
    with warnings.catch_warnings():  # torchvision.io warns once per image that it is deprecated
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        if num_workers > 0:
            with ThreadPoolExecutor(num_workers) as pool:
                decoded = [
                    img
                    for chunk in pool.map(lambda c: _decode_chunk(c, size), chunks)
                    for img in chunk
                ]
        else:
            decoded = [img for chunk in chunks for img in _decode_chunk(chunk, size)]
    expected = tuple(decoded[0].shape)
    for path, img in zip(files, decoded):
        if tuple(img.shape) != expected:
            raise UserError(
                f"{path}: image size {tuple(img.shape[1:])} differs from {expected[1:]} (size of "
                f"{files[0]}); {mixed_fix}"
            )
    return torch.stack(decoded).contiguous()


# --------------------------------------------------------------------------------------------------
# Folder: every image below <root>, no labels (distillation only)
# --------------------------------------------------------------------------------------------------
FOLDER_HELDOUT_MAX = 1000  # images held out of training for the trainer's per-epoch diagnostics
FOLDER_HELDOUT_FRACTION = 0.1


def _load_folder(data_cfg: DataConfig, split: str) -> Split:
    """Every image below dataset_root, unlabelled (labels 0, no classes). "test" is a fixed seeded
    subset held out of training (10 %, at most 1000, at least 2 images): the trainer's per-epoch
    diagnostics read it; "train" is the rest. The same subset for every run, seed and rank
    (SUBSET_SEED)."""
    root = os.path.abspath(os.path.expanduser(data_cfg.dataset_root))
    files = _list_folder(root)
    size = data_cfg.source_size
    cache_path = _cache_path(data_cfg, f"folder_{size or 'native'}", _source_key(root, files))
    cached = _read_cache(cache_path)
    if cached is None:
        fix = (
            "set data.source_size=N to store every image at N x N px (shorter side resized, centre"
            " crop)"
        )
        images = _decode_all(files, data_cfg.num_workers, size=size, mixed_fix=fix)
        cached = (images, torch.zeros(len(images), dtype=torch.int64), [])
        _write_cache(cache_path, cached, data_cfg)
    images = cached[0]
    held = folder_heldout(len(images))
    if len(images) - len(held) < 1:
        raise UserError(
            f"{root}: {len(images)} images are too few for dataset_name: folder (2 are held out for"
            " diagnostics); add images"
        )
    mask = torch.zeros(len(images), dtype=torch.bool)
    mask[held] = True
    keep = torch.nonzero(mask if split == "test" else ~mask).flatten()
    return images[keep].contiguous(), torch.zeros(len(keep), dtype=torch.int64), []


def folder_heldout(n: int) -> torch.Tensor:
    """Sorted indices of the held-out images of an n-image folder."""
    count = min(FOLDER_HELDOUT_MAX, max(2, int(n * FOLDER_HELDOUT_FRACTION)))
    g = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(n, generator=g)[:count].sort().values


def _list_folder(root: str) -> List[str]:
    """Image files below root in any sub-folder, sorted; hidden folders (the tensor cache) are
    skipped."""
    if not os.path.isdir(root):
        raise UserError(
            f"{root}: data.dataset_root not found; point it at a folder of images (dataset_name:"
            f" folder reads every {'/'.join(IMAGE_EXTENSIONS)} file below it)"
        )
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        files += [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise UserError(
            f"{root}: no images ({'/'.join(IMAGE_EXTENSIONS)}) below data.dataset_root;"
            " dataset_name: folder reads every image in any sub-folder of it"
        )
    return sorted(files)


# --------------------------------------------------------------------------------------------------
# Tensor cache
# --------------------------------------------------------------------------------------------------

def _source_key(root: str, files: Sequence[str]) -> str:
    """Short hash of the files' relative paths, sizes and mtimes: any added, removed or edited file
    rebuilds."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{root}".encode())
    for path in files:
        st = os.stat(path)
        h.update(f"|{os.path.relpath(path, root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _cache_path(data_cfg: DataConfig, stem: str, key: str) -> str:
    cache_dir = data_cfg.cache_dir or os.path.join(data_cfg.dataset_root, ".tensor_cache")
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), f"{stem}_{key}.pt")


def _read_cache(path: str) -> Optional[Split]:
    _remove_stale_temps(os.path.dirname(path))
    if not os.path.isfile(path):
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        images, labels, classes = d["images"], d["labels"], list(d["classes"])
        ok = (images.dtype == torch.uint8 and images.dim() == 4 and labels.dtype == torch.int64
              and labels.shape == (images.shape[0],))
    except Exception:  # truncated or foreign file: rebuild it rather than fail
        ok = False
    if not ok:
        warnings.warn(f"{path}: tensor cache is corrupt, rebuilding it")
        return None
    return images.contiguous(), labels, classes


def _write_cache(path: str, split: Split, data_cfg: DataConfig) -> None:
    """Atomic write, so concurrent ranks or a killed job never leave a half file; never fatal (an
    optimisation)."""
    images, labels, classes = split
    try:
        atomic_write(
            path,
            lambda f: torch.save({"images": images, "labels": labels, "classes": list(classes)}, f),
        )
    except WriteError as e:  # read-only data or full disk
        cache_dir = os.path.dirname(path)
        if cache_dir not in _warned_cache_dirs:
            _warned_cache_dirs.add(cache_dir)
            warnings.warn(
                f"{cache_dir}: cannot write the tensor cache ({e.reason}); "
                "going on without it. Set data.cache_dir to a writable folder to decode only once"
            )
        return
    _prune_old_versions(path, data_cfg)


def _prune_old_versions(path: str, data_cfg: DataConfig) -> None:
    """Older versions of the cache at `path` (other file lists of its source) are deleted from the
    default cache folder, which holds one source only; a data.cache_dir may be shared by several
    sources: there they are listed instead."""
    cache_dir, name = os.path.split(path)
    stem = name[:-len("_0123456789ab.pt")]
    same_stem = re.compile(re.escape(stem) + r"_[0-9a-f]{12}\.pt$")
    older = [os.path.join(cache_dir, f) for f in os.listdir(cache_dir)
             if same_stem.match(f) and f != name]
    if older and data_cfg.cache_dir is None:
        for old in older:
            try:
                os.remove(old)
            except OSError:
                pass
    elif older:
        size = sum(os.path.getsize(f) for f in older if os.path.isfile(f))
        warnings.warn(f"{cache_dir}: {len(older)} older tensor caches {stem}_*.pt "
                      f"({size / 1e9:.2f} GB) of other file lists; delete those no run uses (this "
                      f"run wrote {name})")


def _remove_stale_temps(cache_dir: str) -> None:
    """Temp files of a cache write killed long ago (as large as the cache); a young one may be
    another rank's write in progress."""
    try:
        entries = list(os.scandir(cache_dir))
    except OSError:
        return
    for e in entries:
        try:
            if STALE_TEMP_RE.match(e.name) and time.time() - e.stat().st_mtime > STALE_TEMP_S:
                os.remove(e.path)
        except OSError:
            pass


def data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha1 of the images and labels a run trains on (after max_samples): an added, removed or
    replaced image, or another subset, changes it. Bytes, not file names: the same for every
    source, decoded or read from the tensor cache."""
    h = hashlib.sha1(f"{tuple(images.shape)}:{images.dtype}".encode())
    h.update(images.cpu().contiguous().numpy().tobytes())
    h.update(labels.cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Subsets and epoch plans
# --------------------------------------------------------------------------------------------------

def stratified_subset(labels: torch.Tensor, n: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    """Sorted indices of n samples, each class kept in proportion (largest remainders get the
    leftovers)."""
    labels = torch.as_tensor(labels)
    if n >= len(labels):
        return torch.arange(len(labels))
    counts = Counter(labels.tolist())
    classes = sorted(counts)
    exact = {c: n * counts[c] / len(labels) for c in classes}
    take = {c: int(exact[c]) for c in classes}
    leftover = n - sum(take.values())
    for c in sorted(classes, key=lambda c: (-(exact[c] - take[c]), c))[:leftover]:
        take[c] += 1
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:take[c]]])
    return torch.cat(keep).sort().values


def _epoch_seed(seed: int, epoch: int) -> int:
    # A hash, not seed + epoch: (seed=0, epoch=1) and (seed=1, epoch=0) must not share a
    # permutation.
    return int(hashlib.sha256(f"{seed}:{epoch}".encode()).hexdigest()[:15], 16)


def epoch_indices(
    num_samples: int,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    max_steps: Optional[int] = None,
) -> torch.Tensor:
    """This rank's sample indices for one epoch, LongTensor [steps, batch_size].

    Every rank draws the same permutation for (seed, epoch) and takes its slice of each global batch
    of batch_size * world_size, so world_size=2 with batch B sees exactly the batches of
    world_size=1 with 2B. The last incomplete global batch is dropped; max_steps caps the number of
    steps.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    global_batch = batch_size * world_size
    steps = num_samples // global_batch
    if steps == 0:
        raise UserError(
            f"{num_samples} training images are fewer than one global batch of {global_batch} "
            f"(train.batch_size={batch_size} x {world_size} GPUs); lower train.batch_size "
            "or raise data.max_samples"
        )
    if max_steps is not None:
        steps = min(steps, max_steps)
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    perm = torch.randperm(num_samples, generator=g)
    return perm[:steps * global_batch].view(steps, world_size, batch_size)[:, rank].contiguous()
