"""Teacher-view cache: the frozen teacher's targets for K seeded augmented views of every training
image, once.

With `train.cache_teacher_features: true` the trainer never runs the teacher inside a training step.
Before training it loads (or, on rank 0, builds) for every image i and view k < K =
`train.teacher_cache_views`:

    params[k, i]      the view's (x0, y0, w, h, flip, blur_sigma): transforms.sample_view_params
    over all N images
                      with a generator seeded from (train.seed, k), so they are regenerated, never
                      stored
    targets[i, k]     bf16 [1 + Ns, D]: the teacher's CLS token, then its patch tokens area-pooled
    onto the student's
                      grid (DistillLoss.pool_teacher), for the student view params[k, i] resized to
                      teacher_img_size

Each epoch draws one of the K views per image (seeded by (train.seed, epoch)); the student is
rendered from that view's params, so it sees exactly the pixels the teacher saw. Target
normalisation (model.target_norm) is applied in the loss as for live targets, and the per-epoch
diagnostics still use the live teacher.

Size: N * K * (1 + Ns) * D * 2 bytes. CIFAR-10 (N = 50k), ViT-B teacher (D = 768), 6x6 student grid
(Ns = 36): 50,000 * 37 * 768 * 2 B = 2.8 GB per view, 22.7 GB for the default K = 8. The file is
memory-mapped, so RAM holds what the page cache can; each epoch gathers its 2.8 GB (one view per
image) on the host in a background thread during the previous epoch and keeps it on the device for
that epoch.

Location: <parent of train.checkpoint_dir>/teacher_cache/<key>/ (runs side by side share it),
holding targets.bin (raw uint16 bit patterns of bf16, C order [N, K, 1 + Ns, D]) and meta.json
(shape, layout, the key). The key hashes everything the targets depend on: teacher (name, source,
img size, pretrained, kwargs, weights file path/size/mtime and a fingerprint of the loaded weights),
data (dataset, root, max_samples, N, a fingerprint of 1024 images), views (seed, K, minimal aug,
blur_prob, student img size and grid), autocast precision and, when not the last block alone, the
target blocks (model.teacher_blocks, how combined). Any change builds a new directory (old ones are
listed, not deleted). A build is written in a temp directory and renamed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

import distributed
from checkpoint import current_umask, make_dirs, remove_empty_dirs
from config import Config, UserError
from dinov2_patcher import teacher_identity
from models import autocast
from transforms import model_inputs, sample_view_params

CACHE_VERSION = 1  # bump when what is stored (or how a view is rendered) changes
TARGETS_FILE, META_FILE = "targets.bin", "meta.json"
BUILD_BATCH = 256  # teacher forwards per batch while building
STALE_BUILD_S = 600  # a temp build directory untouched this long belongs to a killed build
FINGERPRINT_IMAGES = 1024


def _seed(*parts: Any) -> int:
    # Hashed, so (seed=0, view=1) and (seed=1, view=0) draw unrelated views.
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def view_params(
    num_images: int, num_views: int, seed: int, minimal: bool, blur_prob: float
) -> torch.Tensor:
    """float32 [K, N, 6]: view k of image i, a pure function of (seed, k, N, minimal, blur_prob)."""
    return torch.stack([
        sample_view_params(
            num_images,
            torch.Generator().manual_seed(_seed("teacher_cache_view", seed, k)),
            minimal,
            blur_prob,
        )
        for k in range(num_views)
    ])


def epoch_views(num_images: int, num_views: int, seed: int, epoch: int) -> torch.Tensor:
    """int64 [N]: which of the K cached views each image uses in this epoch (the same on every
    rank)."""
    generator = torch.Generator().manual_seed(_seed("teacher_cache_epoch", seed, epoch))
    return torch.randint(num_views, (num_images,), generator=generator)


def cache_root(cfg: Config) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(cfg.train.checkpoint_dir)), "teacher_cache")


# --------------------------------------------------------------------------------------------------
# key
# --------------------------------------------------------------------------------------------------
def _tensor_sample(h, name: str, t: torch.Tensor, count: int = 256) -> None:
    flat = t.detach().flatten()
    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    h.update(flat[::max(1, flat.numel() // count)][:count].float().cpu().numpy().tobytes())


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A strided sample of every tensor: catches other weights (or another seed for a random-init
    teacher)."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        _tensor_sample(h, name, t)
    return h.hexdigest()[:16]


def images_fingerprint(images: torch.Tensor) -> str:
    """1024 evenly spaced images, bytewise: catches other images or another order (targets are
    indexed by position)."""
    pick = (
        torch.linspace(0, len(images) - 1, min(len(images), FINGERPRINT_IMAGES))
        .long()
        .to(images.device)
    )
    h = hashlib.sha1(str(tuple(images.shape)).encode())
    h.update(images[pick].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _file_id(path: Optional[str]) -> Optional[Dict[str, Any]]:
    if path is None:
        return None
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(cfg: Config, teacher, student_grid: Tuple[int, int], images: torch.Tensor,
              amp: Optional[torch.dtype]) -> Dict[str, Any]:
    m, d, t = cfg.model, cfg.data, cfg.train
    key = {
        "version": CACHE_VERSION,
        "teacher": {
            # dinov2_patcher.teacher_identity, the weights path as the file's identity (a cache
            # written before keeps its hash: same fields, same values)
            **{k: v for k, v in teacher_identity(m).items() if k != "weights"},
            "weights": _file_id(m.teacher_weights),
            "fingerprint": weights_fingerprint(teacher),
            "grid": list(teacher.grid_size),
            "embed_dim": teacher.embed_dim,
        },
        "data": {
            "dataset": d.dataset_name,
            "root": os.path.abspath(os.path.expanduser(d.dataset_root)),
            "max_samples": d.max_samples,
            "num_images": len(images),
            "fingerprint": images_fingerprint(images),
        },
        "views": {
            "seed": t.seed,
            "num_views": t.teacher_cache_views,
            "minimal": t.use_minimal_aug,
            "blur_prob": t.blur_prob,
            "student_img_size": m.student_img_size,
            "student_grid": list(student_grid),
        },
        "autocast": str(amp),
    }
    # Only then: caches built before this key existed keep their hash.
    if tuple(m.teacher_blocks) != (-1,):
        key["targets"] = {"blocks": list(m.teacher_blocks), "combine": m.teacher_blocks_combine,
                          "dim": teacher.target_dim}
    return key


def key_hash(key: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def build_cache(
    directory: str,
    cfg: Config,
    teacher,
    pool_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    params: torch.Tensor,
    shape: Tuple[int, ...],
    amp: Optional[torch.dtype],
) -> None:
    """Runs the teacher on every (image, view) and writes targets.bin [N, K, 1 + Ns, D] into
    `directory`.

    The view is rendered by transforms.model_inputs, as for a live step's teacher input. All K views
    of a batch of images are written together: one contiguous block of the file, so the disk sees
    sequential writes.
    """
    out = np.memmap(os.path.join(directory, TARGETS_FILE), dtype=np.uint16, mode="w+", shape=shape)
    for start in range(0, shape[0], BUILD_BATCH):
        batch = images[start:start + BUILD_BATCH]
        views = []
        for k in range(shape[1]):
            _, teacher_x = model_inputs(
                batch,
                params[k, start : start + len(batch)],
                cfg.model.student_img_size,
                cfg.model.teacher_img_size,
                blur=cfg.train.blur_prob > 0,
            )
            with autocast(batch.device, amp):
                t_cls, t_patch = teacher(teacher_x)
            views.append(
                torch.cat([t_cls.float()[:, None], pool_fn(t_patch.float())], dim=1).to(
                    torch.bfloat16
                )
            )
        block = torch.stack(views, dim=1)  # [b, K, 1 + Ns, D]
        out[start:start + len(batch)] = block.view(torch.int16).cpu().numpy().view(np.uint16)
    out.flush()
    del out


def _build_into(root: str, digest: str, key: Dict[str, Any], cfg: Config, teacher, criterion,
                images: torch.Tensor, shape: Tuple[int, ...], amp: Optional[torch.dtype]) -> None:
    """Builds in a temp directory next to the final one, then renames it into place (atomic for
    readers)."""
    final = os.path.join(root, digest)
    nbytes = int(np.prod(shape)) * 2
    try:
        created = make_dirs(root)
        free = shutil.disk_usage(root).free
    except OSError as e:
        raise UserError(f"teacher cache: cannot create {root} ({e.strerror}); make the parent of "
                        f"train.checkpoint_dir writable") from None
    free += _remove_killed_builds(root, digest)
    if free < nbytes * 1.05:
        remove_empty_dirs(created)
        raise UserError(
            f"teacher cache needs {nbytes / 1e9:.1f} GB in {root}, {free / 1e9:.1f} GB free; lower "
            "train.teacher_cache_views or data.max_samples, or free disk space"
        )
    others = [e for e in os.listdir(root) if e != digest and not e.startswith(".")]
    print(
        f"teacher cache: building {final} ({shape[0]} images x {shape[1]} views,"
        f" {nbytes / 1e9:.2f} GB)"
        + (
            f"; {len(others)} other caches in {root} ({_bytes_of(root, others) / 1e9:.2f} GB): "
            "delete those no run uses"
            if others
            else ""
        ),
        flush=True,
    )
    tmp = tempfile.mkdtemp(prefix=f".tmp_{digest}_", dir=root)
    # mkdtemp's 0700 would hide the cache from collaborators
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        started = time.time()
        params = view_params(
            shape[0], shape[1], cfg.train.seed, cfg.train.use_minimal_aug, cfg.train.blur_prob
        )
        build_cache(tmp, cfg, teacher, criterion.pool_teacher, images, params, shape, amp)
        seconds = time.time() - started
        meta = {
            "key_hash": digest,
            "key": key,
            "shape": list(shape),
            "dtype": "bfloat16 as uint16 bit patterns",
            "layout": "[image, view, token (CLS, then pooled patches row-major), dim]",
            "bytes": nbytes,
            "build_seconds": seconds,
            "torch": str(torch.__version__),
            "device": torch.cuda.get_device_name() if images.is_cuda else "cpu",
        }
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        # another run built the same cache meanwhile: keep it
        if _read_meta(final, digest, shape) is not None:
            return
        if os.path.isdir(final):  # an invalid leftover
            shutil.rmtree(final)
        os.rename(tmp, final)
        print(
            f"teacher cache: built in {seconds:.1f} s ({shape[0] * shape[1] / seconds:.0f}"
            " views/s)",
            flush=True,
        )
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_dirs(created)  # nothing built (an error): no empty folder left behind


def _bytes_of(root: str, names) -> int:
    """Bytes of the files directly in the cache directories `names` under root."""
    total = 0
    for name in names:
        try:
            entries = os.scandir(os.path.join(root, name))
            total += sum(f.stat().st_size for f in entries if f.is_file())
        except OSError:
            pass
    return total


def _remove_killed_builds(root: str, digest: str) -> int:
    """Deletes temp directories of builds that stopped writing long ago, of this key or any other (a
    killed build is never finished by anyone); returns the bytes freed."""
    freed = 0
    for entry in os.scandir(root):
        if not (entry.is_dir() and entry.name.startswith(".tmp_")):
            continue
        files = [f for f in os.scandir(entry.path) if f.is_file()]
        last_write = max([f.stat().st_mtime for f in files] + [entry.stat().st_mtime])
        if time.time() - last_write > STALE_BUILD_S:
            freed += sum(f.stat().st_size for f in files)  # the same disk: all of it is free space
            shutil.rmtree(entry.path, ignore_errors=True)
    return freed


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------
def _read_meta(directory: str, digest: str, shape: Tuple[int, ...]) -> Optional[Dict[str, Any]]:
    """The meta dict if `directory` holds a complete cache for this key, else None."""
    try:
        with open(os.path.join(directory, META_FILE)) as f:
            meta = json.load(f)
        size = os.path.getsize(os.path.join(directory, TARGETS_FILE))
    except (OSError, ValueError):
        return None
    ok = (
        meta.get("key_hash") == digest
        and tuple(meta.get("shape", ())) == shape
        and size == int(np.prod(shape)) * 2
    )
    return meta if ok else None


def load_or_build(cfg: Config, teacher, criterion, images: torch.Tensor, amp: Optional[torch.dtype],
                  is_main: bool) -> "TeacherCache":
    """Opens the cache for this config; rank 0 builds it first if it is missing or stale, the others
    wait."""
    student_grid = (criterion.pool_h.shape[0], criterion.pool_w.shape[0])
    shape = (len(images), cfg.train.teacher_cache_views, 1 + student_grid[0] * student_grid[1],
             teacher.target_dim)
    key = cache_key(cfg, teacher, student_grid, images, amp)
    digest, root = key_hash(key), cache_root(cfg)
    directory = os.path.join(root, digest)
    if is_main and _read_meta(directory, digest, shape) is None:
        _build_into(root, digest, key, cfg, teacher, criterion, images, shape, amp)
    distributed.barrier()
    if _read_meta(directory, digest, shape) is None:
        raise UserError(
            f"teacher cache {directory} is missing or incomplete after rank 0 built it; the ranks"
            " must share the file system that holds train.checkpoint_dir"
        )
    return TeacherCache(directory, shape, cfg.train)


class TeacherCache:
    """Memory-mapped targets [N, K, 1 + Ns, D] (bf16) and the K views [K, N, 6] they were computed
    on."""

    def __init__(self, directory: str, shape: Tuple[int, ...], train_cfg):
        self.directory = directory
        self.num_images, self.num_views, self.num_tokens, self.dim = shape
        self.seed = train_cfg.seed
        # mode "c" (copy-on-write) gives a writable array torch accepts without copying; the file is
        # never written.
        array = np.memmap(
            os.path.join(directory, TARGETS_FILE), dtype=np.uint16, mode="c", shape=shape
        )
        self.targets = torch.from_numpy(array).view(torch.bfloat16)
        self.view_params = view_params(
            self.num_images, self.num_views, train_cfg.seed, train_cfg.use_minimal_aug,
            train_cfg.blur_prob,
        )
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending = None  # (epoch, indices, future) of a prefetch

    def gather(
        self, epoch: int, indices: torch.Tensor, pin: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Host tensors for an epoch plan `indices` [S, B]: view params [S, B, 6] and targets [S, B,
        1 + Ns, D]."""
        flat = indices.flatten()
        chosen = epoch_views(self.num_images, self.num_views, self.seed, epoch)[flat]
        params = self.view_params[chosen, flat].view(*indices.shape, -1)
        rows = self.targets.view(-1, self.num_tokens, self.dim)
        out = torch.empty(
            (len(flat), self.num_tokens, self.dim), dtype=torch.bfloat16, pin_memory=pin
        )
        torch.index_select(rows, 0, flat * self.num_views + chosen, out=out)
        return params, out.view(*indices.shape, self.num_tokens, self.dim)

    def prefetch(self, epoch: int, indices: torch.Tensor, device: torch.device) -> None:
        """Starts gathering a later epoch on a host thread (torch's copy releases the GIL) while
        this one trains."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="teacher_cache")
        future = self._executor.submit(self.gather, epoch, indices, device.type == "cuda")
        self._pending = (epoch, indices, future)

    def epoch_batches(self, epoch: int, indices: torch.Tensor, device: torch.device):
        """(view params [S, B, 6], targets [S, B, 1 + Ns, D] bf16), both on `device`; uses a
        matching prefetch."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == epoch and torch.equal(pending[1], indices):
            params, targets = pending[2].result()
        else:
            params, targets = self.gather(epoch, indices, device.type == "cuda")
        # From pinned memory the host goes on queueing steps during the copy; torch keeps the buffer
        # until it ends.
        return params.to(device), targets.to(device, non_blocking=device.type == "cuda")
