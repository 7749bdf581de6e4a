"""TensorBoard and W&B beside log.jsonl: the values they hold are log.jsonl's, a resumed run
continues the same W&B run, and a logger that cannot start is one warning, never a failed run
(tiny CPU runs)."""
from __future__ import annotations

import glob
import json
import os
import site
import subprocess
import sys
import warnings

import pytest

import distill_trainer
import evaluate_checkpoints as ev
from config import ConfigError, config_changes
from helpers import REPO, tiny_config, tiny_overrides
from loggers import WANDB_ID_FILE, Loggers, TensorBoardLogger, open_loggers

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# One step per log window: the step scalars are then the losses of single steps.
TINY = {"train.log_every": 1, "train.num_epochs": 2, "train.save_epochs": [2]}


def train(run_dir, synthetic_root, **extra):
    overrides = tiny_overrides(synthetic_root, run_dir, **{**TINY, **extra})
    return distill_trainer.main(["--override", *overrides])


def epoch_records(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "epoch" in r]


def tensorboard_scalars(folder):
    """{tag: {step: value}} read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc


def wandb_records(path):
    """The protobuf Records of an offline run's .wandb file: W&B's LevelDB-style log, 32 KiB blocks
    of records, each with a 7-byte header (crc32, length, type: 1 full, 2-4 parts)."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, parts, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def stored_id(run_dir):
    with open(os.path.join(run_dir, WANDB_ID_FILE)) as f:
        return f.read().strip()


def wandb_history(path):
    rows = []
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in r.history.item})
    return rows


# ------------------------------------------------------------------------------------------ config
def test_loggers_key_is_validated_and_harmless_on_resume(tmp_path):
    both = {"train.loggers": ["tensorboard", "wandb"]}
    cfg = tiny_config(str(tmp_path), str(tmp_path / "r"), **both)
    assert cfg.train.loggers == ["tensorboard", "wandb"]
    assert tiny_config(str(tmp_path), str(tmp_path / "r")).train.loggers == []  # default: none
    with pytest.raises(ConfigError, match=r"train.loggers.*did you mean 'tensorboard'"):
        tiny_config(str(tmp_path), str(tmp_path / "r"), **{"train.loggers": ["tensorbord"]})
    with pytest.raises(ConfigError, match="distinct names"):
        tiny_config(str(tmp_path), str(tmp_path / "r"), **{"train.loggers": ["wandb", "wandb"]})
    with pytest.raises(ConfigError, match="must be a list of a string"):
        tiny_config(str(tmp_path), str(tmp_path / "r"), **{"train.loggers": "wandb"})
    # a resume may switch loggers on or off, and a checkpoint written before the key existed resumes
    refused, harmless = config_changes({"train": {}}, cfg.to_dict())
    assert "train.loggers" in harmless and "train.loggers" not in refused


def test_evaluator_refuses_an_unknown_logger(tmp_path):
    with pytest.raises(SystemExit) as exc:
        ev.parse_args(["--checkpoint_dir", str(tmp_path), "--loggers", "mlflow"])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------------- tensorboard
def test_tensorboard_scalars_equal_log_jsonl(tmp_path, synthetic_root, capsys):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install tensorboard)")
    run_dir = str(tmp_path / "run")
    assert train(run_dir, synthetic_root, **{"train.loggers": ["tensorboard"]}) == 0
    tags, acc = tensorboard_scalars(os.path.join(run_dir, "tensorboard"))
    records = epoch_records(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    checked = 0
    for r in records:
        for key, value in r.items():
            if key != "global_step" and isinstance(value, float):
                assert tags[f"epoch/{key}"][r["global_step"]] == pytest.approx(value, rel=1e-6), key
                checked += 1
    assert checked >= 2 * 8 + 2  # losses, lr, speed, diagnostics of epochs 1-2; epoch 0's 2
    # one step scalar per step (log_every 1); their mean per epoch is the epoch's loss in log.jsonl
    steps = sorted(tags["train/loss"])
    n = records[1]["global_step"]
    assert steps == list(range(1, 2 * n + 1))
    for r in records[1:]:
        end = r["global_step"]
        window = [tags["train/loss"][s] for s in range(end - n + 1, end + 1)]
        assert sum(window) / n == pytest.approx(r["loss"], rel=1e-5)
    assert tags["train/lr"][n] == pytest.approx(records[1]["lr"], rel=1e-6)
    assert acc.PluginTagToContent("hparams")  # the merged config as hyper-parameters

    # the evaluator adds its numbers and table beside the run's (tensorboard/eval/)
    args = ["--checkpoint_dir", run_dir, "--device", "cpu", "--loggers", "tensorboard"]
    assert ev.main(args) == 0
    with open(os.path.join(run_dir, "eval_results.json")) as f:
        entry = json.load(f)["entries"][0]
    eval_tags, eval_acc = tensorboard_scalars(os.path.join(run_dir, "tensorboard", "eval"))
    assert eval_tags["eval/linear_acc"][2] == pytest.approx(entry["linear_acc"], rel=1e-6)
    assert eval_tags["eval/knn_acc"][2] == pytest.approx(entry["knn_acc"], rel=1e-6)
    assert "eval/table/text_summary" in eval_acc.Tags()["tensors"]


def test_tensorboard_resume_shows_each_step_once(tmp_path, synthetic_root):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install tensorboard)")
    run_dir = str(tmp_path / "run")
    on = {"train.loggers": ["tensorboard"]}
    assert train(run_dir, synthetic_root, **on, **{"train.stop_after_epoch": 1}) == 0
    assert train(run_dir, synthetic_root, **on) == 0
    tags, _ = tensorboard_scalars(os.path.join(run_dir, "tensorboard"))
    records = epoch_records(run_dir)
    assert sorted(tags["epoch/loss"]) == [r["global_step"] for r in records[1:]]
    for r in records[1:]:
        assert tags["epoch/loss"][r["global_step"]] == pytest.approx(r["loss"], rel=1e-6)
    assert len(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))) == 2


class Broken:
    name = "broken"

    def scalars(self, values, step, axis):
        raise OSError("No space left on device")

    def close(self):
        pass


def test_a_failing_logger_is_dropped_with_one_warning_others_go_on(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install tensorboard)")
    good = TensorBoardLogger(str(tmp_path), {"train": {"seed": 0}}, 0, "train")
    live = Loggers([Broken(), good])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            live.record({"epoch": step, "global_step": step, "loss": 1.0 / step})
    live.close()
    assert len(caught) == 1 and "broken logger stopped" in str(caught[0].message)
    assert "No space left on device" in str(caught[0].message)
    tags, _ = tensorboard_scalars(os.path.join(str(tmp_path), "tensorboard"))
    assert tags["epoch/loss"] == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})


# ------------------------------------------------------------------------------------------- wandb
def test_wandb_offline_run_resumes_under_the_stored_id(tmp_path, synthetic_root, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = str(tmp_path / "run")
    on = {"train.loggers": ["wandb"]}
    assert train(run_dir, synthetic_root, **on, **{"train.stop_after_epoch": 1}) == 0
    run_id = stored_id(run_dir)
    assert train(run_dir, synthetic_root, **on) == 0
    runs = sorted(glob.glob(os.path.join(run_dir, "wandb", f"offline-run-*-{run_id}")))
    # the first part and the resumed one
    assert len(runs) == 2, os.listdir(os.path.join(run_dir, "wandb"))
    files = [os.path.join(r, f"run-{run_id}.wandb") for r in runs]
    history = [row for path in files for row in wandb_history(path)]
    logged = {row["global_step"]: row["epoch/loss"] for row in history if "epoch/loss" in row}
    records = epoch_records(run_dir)
    assert logged == pytest.approx({r["global_step"]: r["loss"] for r in records[1:]}, rel=1e-9)
    config = [r.run.config for path in files for r in wandb_records(path)
              if r.WhichOneof("record_type") == "run"]
    stored = {item.key: json.loads(item.value_json) for item in config[0].update}
    assert stored["train"]["loggers"] == ["wandb"]  # the merged config as hyper-parameters

    # the evaluator logs its table to the same W&B run
    assert ev.main(["--checkpoint_dir", run_dir, "--device", "cpu", "--loggers", "wandb"]) == 0
    runs = sorted(glob.glob(os.path.join(run_dir, "wandb", f"offline-run-*-{run_id}")))
    assert len(runs) == 3
    eval_rows = [row for path in glob.glob(os.path.join(runs[-1], "*.wandb"))
                 for row in wandb_history(path)]
    assert any("eval/linear_acc" in row and row["eval_epoch"] == 2 for row in eval_rows)
    tables = [row for row in eval_rows if "eval/table/_type" in row]
    assert len(tables) == 1 and tables[0]["eval/table/nrows"] == 1  # the one checkpoint's row


def test_fresh_run_gets_a_new_wandb_id(tmp_path, synthetic_root, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = str(tmp_path / "run")
    on = {"train.loggers": ["wandb"], "train.num_epochs": 1, "train.save_epochs": [1]}
    assert train(run_dir, synthetic_root, **on) == 0
    first = stored_id(run_dir)
    overrides = tiny_overrides(synthetic_root, run_dir, **{**TINY, **on})
    code = distill_trainer.main(["--override", *overrides, "--no_resume"])
    assert code == 0 and stored_id(run_dir) != first


def test_wandb_without_network_or_mode_logs_offline_with_one_warning(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install wandb)")
    for name in ("WANDB_MODE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # a server that refuses at once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_loggers(["wandb"], str(tmp_path), {"train": {"seed": 0}}) as live:
            assert live  # started, offline
            live.record({"epoch": 1, "global_step": 3, "loss": 0.5})
    assert [str(w.message).split(",")[0] for w in caught] == ["wandb: no network"]
    run_id = stored_id(str(tmp_path))
    files = glob.glob(os.path.join(str(tmp_path), "wandb", f"offline-run-*-{run_id}", "*.wandb"))
    assert [row["epoch/loss"] for row in wandb_history(files[0]) if "epoch/loss" in row] == [0.5]


@pytest.mark.slow
def test_wandb_set_but_not_installed_is_one_warning_and_the_run_finishes(tmp_path, synthetic_root):
    # "Not installed", honestly: a fresh interpreter whose only site-packages is a copy (of links)
    # of this one without wandb, and no site module (which would add the real site-packages back).
    hidden = tmp_path / "site-packages"
    hidden.mkdir()
    for folder in site.getsitepackages():
        for name in os.listdir(folder):
            if not name.lower().startswith("wandb") and not (hidden / name).exists():
                os.symlink(os.path.join(folder, name), hidden / name)
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(synthetic_root, run_dir, **{**TINY, "train.loggers": ["wandb"]})
    script = ("import importlib.util, sys\n"
              "assert importlib.util.find_spec('wandb') is None, 'wandb still importable'\n"
              "import distill_trainer\n"
              f"sys.exit(distill_trainer.main(['--override', *{overrides!r}]))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "WANDB"))}
    env.update(PYTHONPATH=os.pathsep.join([REPO, str(hidden)]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-S", "-c", script], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mentions = [line for line in proc.stderr.splitlines() if "wandb" in line]
    assert len(mentions) == 1, proc.stderr
    assert mentions[0].startswith("warning: wandb logger not started"), proc.stderr
    assert "No module named 'wandb'" in mentions[0] and "pip install" in mentions[0]
    assert [r["epoch"] for r in epoch_records(run_dir)] == [0, 1, 2]
    assert os.path.isfile(os.path.join(run_dir, "checkpoint_epoch_2.pth"))
