"""Process-group setup for torchrun, srun (SLURM) or a single process, and the small collectives the
trainer uses."""
from __future__ import annotations

import datetime
import os
import re
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list such as 'gpu[012-015,020],login1' -> 'gpu012'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r} could not be parsed; set MASTER_ADDR")
    prefix, ranges = match.group(1), match.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _env_from_slurm() -> None:
    """Translates srun's per-task variables into torch.distributed's (rank, world size, master
    address/port)."""
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    os.environ.setdefault("MASTER_ADDR", first_slurm_host(os.environ["SLURM_JOB_NODELIST"]))
    # A port derived from the job id lets several jobs share a node without colliding.
    os.environ.setdefault("MASTER_PORT", str(15000 + int(os.environ["SLURM_JOB_ID"]) % 20000))


def require(names, message: str) -> None:
    """One line naming the missing variables of a launcher's environment (`message` has one {})."""
    missing = [v for v in names if v not in os.environ]
    if missing:
        raise UserError(message.format(", ".join(missing)))


def detect_launcher() -> str:
    """'torchrun', 'slurm' or 'single'. A half-set torchrun environment is an error rather than a
    silent fallback."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        present = ", ".join(v for v in TORCHRUN_VARS if v in os.environ)
        require(TORCHRUN_VARS, f"distributed environment is half set: {present} present but {{}} "
                               f"missing; launch with torchrun/srun or unset them")
        return "torchrun"
    # sbatch alone sets SLURM_PROCID too; only an srun step with several tasks is a distributed
    # launch.
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
        require(SLURM_VARS, "SLURM environment is half set: {} missing; launch with srun")
        return "slurm"
    return "single"


def init_distributed(device_type: str) -> DistInfo:
    launcher = detect_launcher()
    if launcher == "single":
        return DistInfo()
    if launcher == "slurm":
        _env_from_slurm()
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    )
    if info.world_size == 1:
        return info
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        # one GPU per task: index 0
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return info


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (used to agree on stopping after a
    signal)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def on_main_rank(fn, is_main: bool, device: torch.device) -> None:
    """Runs `fn` on rank 0 only; all ranks then learn whether it failed, so a UserError there (disk
    full, bad directory) ends every rank with an error instead of leaving the others waiting at a
    barrier."""
    error = None
    if is_main:
        try:
            fn()
        except UserError as e:
            error = e
    if any_rank(error is not None, device):
        raise error or UserError("rank 0 stopped with an error (its message is in the rank-0 log)")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup(together: bool = True) -> None:
    """Ranks leave together after a normal end: a rank that tears down gloo while a peer still talks
    to it aborts the peer. After an error the peers may never arrive, so then there is no
    barrier."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


class HandledSignals:
    """Installs `self._handle` for SIGNALS while in the `with` block and puts the previous handlers
    back after, so an in-process caller gets its own handling back between runs."""
    SIGNALS: tuple = ()

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError
