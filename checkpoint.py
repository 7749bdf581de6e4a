"""Run files: atomic writes, the run directory's lock, checkpoints (one-line errors on bad files,
prefix stripping for legacy files), run metadata (git sha, versions, GPU) for config.yaml and result
headers."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

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

    A crash never leaves a half file at `path`: readers see the old file or the new one. A failed
    write (disk full, permission) removes the temp file, leaves the previous `path` intact, and
    raises a one-line WriteError saying so. The file gets the mode the umask gives any new file
    (mkstemp alone would make it 0600, unreadable to the collaborators on a shared cluster).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp, created = None, None, []
    try:
        created = make_dirs(directory)
        fd, tmp = tempfile.mkstemp(
            prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory
        )
        with os.fdopen(fd, "wb") as f:
            fd = None
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        reason = e.strerror or str(e)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        remove_empty_dirs(created)  # a failed first write leaves no empty folders behind
        raise WriteError(f"could not write {path}: {reason}; the previous file is untouched. "
                         f"Free disk space or fix permissions of {directory}", reason) from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def make_dirs(path: str) -> List[str]:
    """os.makedirs(path, exist_ok=True) that returns the folders it created, outermost first."""
    missing, head = [], os.path.abspath(path)
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    os.makedirs(path, exist_ok=True)
    return missing[::-1]


def remove_empty_dirs(created: List[str]) -> None:
    """Removes the folders make_dirs created, innermost first, as long as they are empty."""
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:
            return


class RunDirLock:
    """An exclusive lock on a run directory, held by one trainer for its whole run.

    fcntl.flock on <dir>/.lock: the OS releases it when the process ends, however it ends, so a lock
    file left by a killed run never blocks the next one. acquire() creates the directory if needed;
    release() removes the lock file and then the folders acquire() created if nothing else was
    written to them, so a run that fails on bad input leaves no empty folders behind. On file
    systems without flock (some Lustre mounts) it warns and goes on.
    """
    NAME = ".lock"

    def __init__(self, directory: str):
        self.directory, self.path = directory, os.path.join(directory, self.NAME)
        self.fd: Optional[int] = None
        self.created: List[str] = []

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        import fcntl  # POSIX only, like the clusters this runs on
        try:
            self.created = make_dirs(self.directory)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = (
                        os.read(fd, 200).decode(errors="replace").strip()
                        or "a process that just started"
                    )
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise UserError(
                            f"train.checkpoint_dir {self.directory} is in use by another trainer "
                            f"({holder}); wait for it to end, or use another train.checkpoint_dir"
                        ) from None
                    warnings.warn(
                        f"cannot lock {self.path} ({e.strerror}); a second trainer started on this "
                        "train.checkpoint_dir would not be stopped"
                    )
                    self.fd = os.open(self.path, os.O_RDWR)
                    return
                # The holder we waited for may have removed the file meanwhile: then lock the one
                # now at the path.
                try:
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
        except OSError as e:
            remove_empty_dirs(self.created)
            raise UserError(
                f"train.checkpoint_dir {self.directory} is not writable ({e.strerror}); choose a "
                "writable directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()} since"
            f" {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(),
        )
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still locked: nobody else can hold this file now
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        remove_empty_dirs(self.created)


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """torch.save through atomic_write: `path` is always a complete checkpoint (the old one or the
    new one)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """torch.load(weights_only=True) with one-line errors for a missing, truncated or foreign
    file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # truncated zip (RuntimeError, OSError), bad pickle, a text file (KeyError, IndexError)
    except Exception as e:
        text = _text_start(path)
        if text is not None:
            raise UserError(
                f"checkpoint {path} is not a checkpoint: it holds text ({text!r}); point to a "
                "checkpoint_*.pth file written by distill_trainer.py"
            ) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint {path} is truncated or corrupt ({reason[:120]}); delete it or point to"
            " another file"
        ) from None
    if not isinstance(ckpt, dict):
        raise UserError(
            f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict with a 'student'"
            " entry"
        )
    return ckpt


def _text_start(path: str, size: int = 40) -> Optional[str]:
    """The first characters of a file that is plain text (a config or a note saved as .pth), else
    None."""
    try:
        with open(path, "rb") as f:
            # a character cut at `size` is dropped
            text = f.read(size).decode("utf-8", errors="ignore")
    except OSError:
        return None
    printable = all(c.isprintable() or c in "\t\r\n" for c in text)
    return " ".join(text.split()) if text.strip() and printable else None


def capture_rng() -> Dict[str, Any]:
    """Global torch RNG (drop path, dropout). Augmentation needs none: it is a function of (seed,
    epoch, step)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # this process's device only: GPU counts may differ on resume
        state["cuda"] = torch.cuda.get_rng_state()
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


# --------------------------------------------------------------------------------------------------
# Run inputs: is this the same run? (trainer resume and run_experiments' reuse of an arm ask here)
# --------------------------------------------------------------------------------------------------
def state_digest(state: Dict[str, torch.Tensor]) -> str:
    """sha1 of every tensor's name, dtype, shape and bytes: other weights (or init) differ."""
    h = hashlib.sha1()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_id(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """Size and mtime of a file (None for no file): a cheap test that it is unchanged."""
    if path is None or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def teacher_record(weights_path: Optional[str], build: Callable[[], torch.nn.Module],
                   stored: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """{file: file_id, weights: state_digest} of the teacher. With `stored` (a checkpoint's
    record) and the file unchanged by size and mtime, the stored digest is taken as is: `build`
    (a teacher build) is then not called."""
    file = file_id(weights_path)
    # No file: the config alone (name, pretrained, seed) names the weights; it is compared anyway.
    if stored and stored.get("file") == file and stored.get("weights"):
        return dict(stored)
    return {"file": file, "weights": state_digest(build().state_dict())}


def run_inputs(data_digest: str, teacher: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What a checkpoint records of its run's inputs besides the config (ckpt['inputs'])."""
    return {"data": data_digest, "teacher": teacher, "code": run_metadata()["git_sha"]}


Changes = Dict[str, Tuple[Any, Any]]


def input_changes(ckpt: Dict[str, Any], config: Dict[str, Dict[str, Any]],
                  inputs: Optional[Dict[str, Any]]) -> Tuple[Changes, Changes]:
    """(changes that make it another run, changes only noted), each {name: (stored, now)}: the
    config's keys (config.config_changes), the data and teacher digests, and the code version
    (noted, never refused). A checkpoint written before inputs were recorded has no digests:
    only its config is compared."""
    from config import config_changes
    refused, noted = config_changes(ckpt.get("config") or {}, config)
    stored = ckpt.get("inputs")
    # A changed config key is the cause to name: other digests follow from it (another seed is
    # another random teacher).
    if isinstance(stored, dict) and inputs is not None and not refused:
        if stored.get("data") != inputs["data"]:
            refused["data (the selected training images)"] = (stored.get("data"), inputs["data"])
        old_t, new_t = stored.get("teacher") or {}, inputs["teacher"] or {}
        if old_t.get("weights") != new_t.get("weights"):
            where = (new_t.get("file") or {}).get("path") or "the teacher"
            refused[f"teacher weights ({where})"] = (old_t.get("weights"), new_t.get("weights"))
        if stored.get("code") != inputs["code"]:
            noted["code version (git sha)"] = (stored.get("code"), inputs["code"])
    return refused, noted


def check_same_inputs(path: str, ckpt: Dict[str, Any], config: Dict[str, Dict[str, Any]],
                      inputs: Optional[Dict[str, Any]], way_out: str) -> Changes:
    """A one-line UserError naming what differs when `ckpt` (read from `path`) was not made from
    these inputs; else the changes that are only noted."""
    refused, noted = input_changes(ckpt, config, inputs)
    if refused:
        listed = ", ".join(f"{key} {_shown(old)} -> {_shown(new)}"
                           for key, (old, new) in refused.items())
        raise UserError(f"{path} was trained with other settings: {listed}; {way_out}")
    return noted


def _shown(value: Any) -> str:
    import json
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------------
# Output paths: every entry script checks each file it will write here, before any work
# --------------------------------------------------------------------------------------------------
RUN_FILE_RE = re.compile(r"(log\.jsonl|config\.yaml|checkpoint_.*\.pth|\.lock)$")
CACHE_DIRS = (".tensor_cache", "teacher_cache")


def check_output_file(flag: str, path: str, suffix: str = ".json",
                      beside: Sequence[str] = (".md", ".png"), also: Sequence[str] = ()) -> None:
    """Refuses, in one line naming `flag`, an output `path` (or a same-stem file `beside` it, or
    a path in `also` written with it) that would overwrite a training run's own files or a cache,
    lacks `suffix`, is a directory, or cannot be written."""
    stem, ext = os.path.splitext(path)
    paths = [path] + [stem + b for b in beside] + list(also)
    example = os.path.join(os.path.dirname(path), "eval_results" + suffix)
    for p in paths:
        parts = os.path.abspath(p).split(os.sep)
        if RUN_FILE_RE.match(os.path.basename(p)) or any(d in CACHE_DIRS for d in parts[:-1]):
            raise UserError(f"{flag} {path}: would overwrite {p}, a file of a training run (log, "
                            f"config, checkpoint, lock) or a cache; pass another file, e.g. "
                            f"{flag} {example}")
    if ext != suffix:
        also = f" ({', '.join(beside)} files go beside it, same stem)" if beside else ""
        raise UserError(f"{flag} {path}: must end in {suffix}{also}; pass e.g. {flag} "
                        f"{stem}{suffix}")
    for p in paths:
        if os.path.isdir(p):
            raise UserError(f"{flag} {path}: {p} is a directory; pass a file path, e.g. {flag} "
                            f"{os.path.join(p, 'results' + suffix)}")
        if os.path.exists(p) and not os.access(p, os.W_OK):
            raise UserError(f"{flag} {path}: {p} exists and is not writable; fix its permissions "
                            f"or pass another file")
    out_dir = os.path.dirname(os.path.abspath(path))
    existing = out_dir  # created later: judge its nearest existing ancestor (a file blocks it too)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UserError(f"{flag} {path}: {out_dir} is not writable; pass a writable {flag}")
