"""Run files: atomic writes, checkpoints (one-line errors on bad files, prefix stripping for legacy files), run
metadata (git sha, versions, GPU) for config.yaml and result headers."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, BinaryIO, Callable, Dict

import torch

from config import UserError

PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Drops DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes, in any order and number."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


class WriteError(UserError):
    """A failed atomic_write; `reason` is the OS's word for it (e.g. 'No space left on device')."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Calls write(f) on a temp file in the same directory, fsyncs, then renames it to `path`.

    A crash never leaves a half file at `path`: readers see the old file or the new one. A failed write (disk full,
    permission) removes the temp file, leaves the previous `path` intact, and raises a one-line WriteError saying so.
    The file gets the mode the umask gives any new file (mkstemp alone would make it 0600, unreadable to the
    collaborators on a shared cluster).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = None, None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            fd = None
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        reason = e.strerror or str(e)
        raise WriteError(f"could not write {path}: {reason}; the previous file is untouched. "
                         f"Free disk space or fix permissions of {directory}", reason) from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """torch.save through atomic_write: `path` is always a complete checkpoint (the old one or the new one)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """torch.load(weights_only=True) with one-line errors for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        # OSError: the zip reader raises EINVAL for a file cut before its central directory (e.g. first 5 kB).
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is truncated or corrupt ({reason[:120]}); delete it or point to another "
                        f"file") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict with a 'student' entry")
    return ckpt


def capture_rng() -> Dict[str, Any]:
    """Global torch RNG (drop path, dropout). Augmentation needs none: it is a function of (seed, epoch, step)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only: GPU counts may differ on resume
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def run_metadata() -> Dict[str, Any]:
    """Where a result came from: git sha of this repo, Python and package versions, GPU name."""
    import timm
    import torchvision
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return {"git_sha": sha, "python": sys.version.split()[0], "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "timm": str(timm.__version__),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
