"""Result files of evaluate_checkpoints.py and run_experiments.py: the probes' note, the log.jsonl
reader, the markdown table, the accuracy and loss figure, and the atomic write of the JSON, markdown
and PNG files.

    report.write_files("run/eval_results.json", {"entries": entries}, markdown,
    report.plot_png(series, {}, {}, "kd")) # -> run/eval_results.json, run/eval_results.md,
    run/eval_results.png
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import metrics
from checkpoint import atomic_write
from metrics import COLLAPSE_COS, COLLAPSE_MIN_RANK, COLLAPSE_MIN_SPREAD


def probe_note(keys: Optional[Iterable[str]] = None) -> str:
    """The legend of the probe tables: a sentence per probe of metrics.PROBES (only those in `keys`,
    the table's columns, when given), then the diagnostics."""
    shown = set(metrics.PROBES) if keys is None else set(keys)
    notes = [p.note for p in metrics.PROBES.values() if p.key in shown]
    return " ".join(notes + [
        f"Diagnostics on test features; collapsed = effective rank of the centered features < "
        f"{COLLAPSE_MIN_RANK}, or their spread (mean distance to the mean) below "
        f"{COLLAPSE_MIN_SPREAD:g} of the mean feature norm; collapsed (legacy cos) = mean "
        f"pairwise cosine > {COLLAPSE_COS}."])


Points = Sequence[Tuple[float, float]]
# (title, the row's key or a function of the row, format spec); the JSON files hold the unrounded
# values.
Column = Tuple[str, Union[str, Callable[[Any], Any]], str]


def read_log(checkpoint_dir: str) -> List[Dict[str, Any]]:
    """The trainer's log.jsonl records: one per epoch ("epoch" key) and events such as {"event":
    "resumed", ...}; a missing file or unreadable lines are skipped."""
    path = os.path.join(checkpoint_dir, "log.jsonl")
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def loss_curve(checkpoint_dir: str, key: str = "loss") -> List[Tuple[int, float]]:
    """(epoch, mean of log key `key`: the training loss, or a term loss_<name>) per logged epoch;
    epoch 0 (before training) has no loss."""
    return [(int(r["epoch"]), float(r[key])) for r in read_log(checkpoint_dir)
            if isinstance(r.get("epoch"), int) and isinstance(r.get(key), (int, float))]


def markdown_table(rows: Sequence[Any], columns: Sequence[Column], missing: str = "n/a") -> str:
    """One line per row; None is `missing`, booleans are yes/no."""
    def cell(row: Any, get: Union[str, Callable], spec: str) -> str:
        value = get(row) if callable(get) else row[get]
        if value is None:
            return missing
        if isinstance(value, bool):
            return "yes" if value else "no"
        return format(value, spec)

    lines = [
        "| " + " | ".join(title for title, _, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += [
        "| " + " | ".join(cell(row, get, spec) for _, get, spec in columns) + " |" for row in rows
    ]
    return "\n".join(lines)


def plot_png(
    series: Dict[str, Points],
    baselines: Dict[str, float],
    losses: Dict[str, Points],
    title: str,
    **marks: Any,
) -> bytes:
    """plot_figure as PNG bytes."""
    return png_bytes(plot_figure(series, baselines, losses, title, **marks))


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def plot_figure(
    series: Dict[str, Points],
    baselines: Dict[str, float],
    losses: Dict[str, Points],
    title: str,
    chance: Optional[float] = None,
    collapsed: Points = (),
    loss_name: Optional[str] = None,
):
    """Test top-1 % vs epoch, a line per series (name -> points) and a horizontal line per baseline
    (name -> %), the chance level (%) dotted and `collapsed` points crossed out; below it the
    training loss curves (name -> points), titled `loss_name`, each in the colour of the series of
    the same name. Returns a matplotlib Figure."""
    # no pyplot: no global backend state in the caller's process
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = {name: points for name, points in series.items() if points}
    losses = {name: points for name, points in losses.items() if points}
    fig = Figure(figsize=(7.5, 3.4 * (2 if losses else 1) + 0.4))
    axes = fig.subplots(2 if losses else 1, 1, sharex=True, squeeze=False)[:, 0]
    colour = {
        name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys([*series, *losses, *baselines]))
    }
    for name, points in series.items():
        axes[0].plot(*zip(*sorted(points)), "o-", color=colour[name], label=name)
    for name, value in baselines.items():
        axes[0].axhline(value, color=colour[name], ls="--", lw=1.2, label=name)
    if chance is not None:
        axes[0].axhline(chance, color="0.4", ls=":", lw=1.2, label=f"chance ({chance:.3g} %)")
    if collapsed:
        axes[0].plot(*zip(*sorted(collapsed)), "x", color="red", ms=10, mew=2, ls="none",
                     label=f"collapsed (centered eff. rank < {COLLAPSE_MIN_RANK})")
    axes[0].set_ylabel("test top-1 (%)")
    axes[0].set_title(title, fontsize=9)
    for name, points in losses.items():
        axes[1].plot(*zip(*sorted(points)), ".-", color=colour[name], label=name)
    if losses:
        axes[1].set_ylabel("training loss (log.jsonl)")
        if loss_name:
            axes[1].set_title(f"training loss: {loss_name}", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


Band = Sequence[Tuple[float, float, float, float]]  # (epoch, mean, lo, hi)


def experiment_figure(series: Dict[str, Band], baselines: Dict[str, Tuple[float, float, float]],
                      losses: Dict[str, Points], objectives: Dict[str, str], title: str):
    """run_experiments' figure: per arm the probe accuracy vs epoch with its 95 % interval (error
    bars), each baseline a line with its interval shaded; below, the training losses, the KD loss
    (one minus cosine) and the supervised cross-entropy on separate axes (different units). Legends
    sit outside the axes, so they cover no line. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = {name: points for name, points in series.items() if points}
    kinds = {"distill": {}, "supervised": {}}
    for name, points in losses.items():
        if points:
            kind = "supervised" if objectives.get(name) == "supervised" else "distill"
            kinds[kind][name] = points
    loss_axes = [kind for kind, curves in kinds.items() if curves]
    fig = Figure(figsize=(9.5, 3.6 * (1 + len(loss_axes))))
    axes = fig.subplots(1 + len(loss_axes), 1, sharex=True, squeeze=False)[:, 0]
    every_name = dict.fromkeys([*series, *losses, *baselines])
    colour = {name: f"C{i % 10}" for i, name in enumerate(every_name)}
    for i, (name, points) in enumerate(series.items()):
        epoch, mean, lo, hi = (list(v) for v in zip(*sorted(points)))
        # arms side by side at each epoch, so their error bars do not hide each other
        epoch = [e + 0.06 * (i - (len(series) - 1) / 2) for e in epoch]
        below = [m - a for m, a in zip(mean, lo)]
        above = [b - m for m, b in zip(mean, hi)]
        axes[0].errorbar(epoch, mean, yerr=[below, above], fmt="o-", capsize=3, color=colour[name],
                         label=name)
    for name, (mean, lo, hi) in baselines.items():
        axes[0].axhline(mean, color=colour[name], ls="--", lw=1.2,
                        label=f"{name} [{lo:.1f}, {hi:.1f}]")
        axes[0].axhspan(lo, hi, color=colour[name], alpha=0.12, lw=0)
    axes[0].set_ylabel("test top-1 (%)")
    axes[0].set_title(title, fontsize=9)
    names = {"distill": "distillation loss (each KD arm's own objective; kd: weighted 1 - cos)",
             "supervised": "supervised cross-entropy of the linear head"}
    for ax, kind in zip(axes[1:], loss_axes):
        for name, points in kinds[kind].items():
            ax.plot(*zip(*sorted(points)), ".-", color=colour[name], label=name)
        ax.set_ylabel("training loss")
        ax.set_title(names[kind], fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def finite(obj: Any) -> Any:
    """NaN/inf -> None, so the results file stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_files(json_path: str, results: Dict[str, Any], markdown: str, png: bytes) -> None:
    """`json_path`, and beside it the same stem .md and .png; each file is whole or absent
    (atomic_write)."""
    stem = os.path.splitext(json_path)[0]
    atomic_write(json_path, lambda f: f.write(json.dumps(finite(results), indent=2).encode()))
    atomic_write(stem + ".md", lambda f: f.write(markdown.encode()))
    atomic_write(stem + ".png", lambda f: f.write(png))
