"""Live views of a run beside log.jsonl: TensorBoard and Weights & Biases (optional packages).

    train.loggers: [tensorboard, wandb]              # in the train config, or --override
    python evaluate_checkpoints.py --checkpoint_dir RUN --loggers tensorboard wandb

log.jsonl stays the record of a run: the loggers get a copy of each of its records (epoch records
with the diagnostics and lr, the "resumed" events) plus the mean losses of every `log_every` window,
rank 0 only, with the merged config as hyper-parameters. TensorBoard writes to RUN/tensorboard/
(the evaluator to RUN/tensorboard/eval/); W&B to RUN/wandb/, under the run id kept in
RUN/wandb_run_id, so a resumed run and the evaluator continue the same W&B run. WANDB_MODE=offline
is honoured; with no WANDB_MODE and no network W&B logs offline (`wandb sync` uploads it later).

A logger that cannot start (package missing, no network, no API key) or fails later is one warning
and is dropped: it never stops the run.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import socket
import urllib.parse
import warnings
from typing import Any, Dict, List, Optional, Sequence

from checkpoint import atomic_write
from config import LOGGER_NAMES

WANDB_ID_FILE = "wandb_run_id"
WANDB_DEFAULT_PROJECT = "dinov2-kd"


def flat_scalars(record: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """The numbers of a (nested) record as flat 'prefix/key' scalars (no None, text, inf, NaN)."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (bool, int, float)) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def flat_config(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'train': {'batch_size': 64}} -> {'train.batch_size': 64}; lists and null as JSON text
    (TensorBoard's hparams take scalars only)."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out


class Loggers:
    """The loggers of one process, fed the same records; one that raises is dropped (a warning)."""

    def __init__(self, backends: Optional[List[Any]] = None):
        self.backends = list(backends or [])

    def __bool__(self) -> bool:
        return bool(self.backends)

    def __enter__(self) -> "Loggers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(self, record: Dict[str, Any], prefix: str = "epoch/") -> None:
        """A log.jsonl record: an event line as text, any other as scalars at its global_step."""
        step = int(record.get("global_step") or 0)
        if "event" in record:
            tag = f"events/{record['event']}"
            self._each("event", lambda b: b.text(tag, json.dumps(record), step))
            return
        values = {k: v for k, v in record.items() if k != "global_step"}
        self.scalars(flat_scalars(values, prefix), step)

    def scalars(self, values: Dict[str, float], step: int, axis: str = "global_step") -> None:
        """Scalars at `step` of the x axis `axis` (W&B plots against it; TensorBoard has one)."""
        self._each("scalars", lambda b: b.scalars(values, step, axis))

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
              markdown: str) -> None:
        rows = [list(r) for r in rows]
        self._each("table", lambda b: b.table(name, list(columns), rows, markdown))

    def close(self) -> None:
        self._each("close", lambda b: b.close())
        self.backends = []

    def _each(self, what: str, call) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as e:  # a live view must never end the run: log.jsonl has everything
                self.backends.remove(backend)
                warnings.warn(f"{backend.name} logger stopped ({what}: {_first_line(e)}); the run "
                              f"goes on, log.jsonl is complete", stacklevel=3)


def open_loggers(names: Sequence[str], run_dir: str, config: Dict[str, Any], first_step: int = 0,
                 fresh: bool = True, job: str = "train") -> Loggers:
    """Starts the named loggers for `run_dir`; each that cannot start is one warning and left out.

    first_step: the global step training continues from (TensorBoard hides what a killed run wrote
    past it); fresh: a new training run (new W&B run id), not a resumed one; job: 'train' or 'eval'.
    """
    unknown = [n for n in names if n not in LOGGER_NAMES]
    if unknown:  # config.py and the evaluator's flag refuse these before any caller gets here
        raise ValueError(f"unknown logger(s) {unknown}; accepted: {', '.join(LOGGER_NAMES)}")
    starts = {"tensorboard": lambda: TensorBoardLogger(run_dir, config, first_step, job),
              "wandb": lambda: WandbLogger(run_dir, config, fresh, job)}
    backends = []
    for name in dict.fromkeys(names):
        try:
            backends.append(starts[name]())
        except Exception as e:  # ImportError, no network, no API key, unwritable folder: "not here"
            warnings.warn(f"{name} logger not started ({_first_line(e)}); the run goes on without "
                          f"it (log.jsonl has every record). Fix: {_fix(name, e, run_dir)}",
                          stacklevel=2)
    return Loggers(backends)


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, run_dir: str, config: Dict[str, Any], first_step: int, job: str):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        from torch.utils.tensorboard.summary import hparams
        folder = os.path.join(run_dir, "tensorboard", *(["eval"] if job == "eval" else []))
        # TensorBoard hides earlier events at steps >= purge_step: what a killed run wrote past the
        # checkpoint resumed from (log.jsonl is trimmed the same way), or all of an earlier run.
        purge = (first_step + 1 if first_step else 0) if job == "train" else None
        self.writer = SummaryWriter(folder, purge_step=purge)
        # hparams() summaries go into this run's own file, not into the sub-run add_hparams makes
        for summary in hparams(flat_config(config), {"epoch/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, values: Dict[str, float], step: int, axis: str) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def table(self, name: str, columns: List[str], rows: List[List[Any]], markdown: str) -> None:
        self.text(name, markdown, 0)  # TensorBoard's text plugin renders markdown tables

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    name = "wandb"

    def __init__(self, run_dir: str, config: Dict[str, Any], fresh: bool, job: str):
        import wandb
        id_path = os.path.join(run_dir, WANDB_ID_FILE)
        run_id = None if (fresh and job == "train") else _read_id(id_path)
        if run_id is None:
            run_id = secrets.token_hex(6)  # W&B ids: letters and digits
            # written first: a run killed during init still resumes under it
            atomic_write(id_path, lambda f: f.write(run_id.encode() + b"\n"))
        mode = None
        server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if not os.environ.get("WANDB_MODE") and not _reachable(server):
            mode = "offline"  # online, wandb.init would retry for 90 s and then fail
            warnings.warn(f"wandb: no network, logging offline to {os.path.join(run_dir, 'wandb')}"
                          f"; upload it later with `wandb sync` (set WANDB_MODE to choose)",
                          stacklevel=3)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_DEFAULT_PROJECT),
                              name=os.path.basename(os.path.normpath(run_dir)), id=run_id,
                              resume="allow", dir=run_dir, config=config, job_type=job, mode=mode,
                              reinit="finish_previous",
                              settings=wandb.Settings(console="off", silent=True))
        # Steps are values, not W&B's own counter: a resumed run logs steps again, which W&B's
        # counter would drop.
        self.run.define_metric("global_step")
        self.run.define_metric("eval_epoch")
        for pattern in ("train/*", "epoch/*", "events/*"):
            self.run.define_metric(pattern, step_metric="global_step")
        self.run.define_metric("eval/*", step_metric="eval_epoch")

    def scalars(self, values: Dict[str, float], step: int, axis: str) -> None:
        self.run.log({axis: step, **values})

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({"global_step": step, tag: text})

    def table(self, name: str, columns: List[str], rows: List[List[Any]], markdown: str) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)})

    def close(self) -> None:
        self.run.finish()
        # finish() can return before W&B's service process has written the last records to
        # RUN/wandb/*/run-ID.wandb; stopping the service waits for them (a new run starts another)
        self.wandb.teardown()


def _fix(name: str, e: Exception, run_dir: str) -> str:
    if isinstance(e, ImportError):
        return f"pip install {name}"
    if name == "wandb":
        return "`wandb login`, or WANDB_MODE=offline (then `wandb sync` where there is network)"
    return f"check that {os.path.join(run_dir, 'tensorboard')} is writable"


def _read_id(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _reachable(url: str, timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; a direct probe would say nothing
    parsed = urllib.parse.urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except (OSError, TypeError):
        return False


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__
