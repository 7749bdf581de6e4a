"""Checkpoint files: atomic writes, one-line errors on bad files, prefix stripping for older checkpoints."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from typing import Any, Dict

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


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Writes to a temp file in the same directory, fsyncs, then renames: a crash never leaves a half file at `path`.

    A failed write (disk full, permission) removes the temp file, leaves the previous `path` intact, and raises
    a UserError saying so.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = None, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            fd = None
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"could not write checkpoint {path}: {e.strerror or e}; the previous file is untouched. "
                        f"Free disk space or fix permissions of {directory}") from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


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
