"""What the trainer does with its run directory beyond checkpoints: a one-line account of an exit
0 that trained nothing or stopped early, --no_resume moving the evaluator's outputs aside, the
tensor cache's stale files."""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

import data_loader
import distill_trainer
from config import DataConfig
from helpers import make_imagefolder, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trainer(root, run_dir, capsys, *flags, **extra):
    capsys.readouterr()
    code = distill_trainer.main([*flags, "--override", *tiny_overrides(root, run_dir, **extra)])
    return code, capsys.readouterr().out


def test_stop_after_epoch_and_a_finished_rerun_say_what_happened(tmp_path, synthetic_root, capsys):
    """Issue 17.21: each exit 0 that did not train to the end says so in one line."""
    run_dir = str(tmp_path / "run")
    code, out = trainer(synthetic_root, run_dir, capsys, **{"train.stop_after_epoch": 1})
    assert code == 0
    assert "stopped after epoch 1 of 2 (train.stop_after_epoch=1); rerun without it" in out
    code, out = trainer(synthetic_root, run_dir, capsys, **{"train.stop_after_epoch": 1})
    assert code == 0 and "nothing trained: " in out
    assert "is at epoch 1 of 2 and train.stop_after_epoch=1" in out
    code, out = trainer(synthetic_root, run_dir, capsys)
    assert code == 0 and "stopped after" not in out and "already complete" not in out
    code, out = trainer(synthetic_root, run_dir, capsys)
    assert code == 0 and "run already complete: " in out
    assert "holds all 2 epochs, nothing was trained" in out


def test_no_resume_moves_the_evaluation_outputs_too(tmp_path, synthetic_root, capsys):
    """Issue 17.10: eval_results.* of the previous run must not stay beside the new checkpoints."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    names = ["checkpoint_epoch_1.pth", "eval_predictions.npz", "eval_results.json",
             "eval_results.md", "eval_results.png"]
    for name in names:
        (run_dir / name).write_text("old")
    code, out = trainer(synthetic_root, str(run_dir), capsys, "--no_resume",
                        **{"train.num_epochs": 1, "train.save_epochs": [1]})
    assert code == 0
    (backup,) = [p for p in run_dir.iterdir() if p.name.startswith("previous_")]
    assert sorted(p.name for p in backup.iterdir()) == names
    assert not any(p.name.startswith("eval_") for p in run_dir.iterdir())


def make_data(tmp_path):
    return DataConfig(dataset_name="imagefolder", num_workers=0, download=False,
                      dataset_root=make_imagefolder(tmp_path / "data", train_per_class=2,
                                                    test_per_class=1))


def test_stale_tensor_cache_temp_files_are_removed(tmp_path):
    """Issue 17.11: a SIGKILL inside the cache write leaves `*.pt.XXXX.tmp`; the next load removes
    old ones (a young one may be another rank's write in progress: kept)."""
    cfg = make_data(tmp_path)
    cache_dir = os.path.join(cfg.dataset_root, ".tensor_cache")
    os.makedirs(cache_dir)
    stale, young = (os.path.join(cache_dir, f"imagefolder_train_abc.pt.{k}.tmp")
                    for k in ("old1", "new1"))
    for path in (stale, young):
        with open(path, "wb") as f:
            f.write(b"x" * 100)
    past = time.time() - 2 * data_loader.STALE_TEMP_S
    os.utime(stale, (past, past))
    data_loader.load_split(cfg, "train")
    assert not os.path.exists(stale) and os.path.exists(young)


def test_one_cache_version_per_source_is_kept(tmp_path):
    """Issue 17.11: when the data changes, the cache of the old file list is removed (default
    cache_dir)."""
    cfg = make_data(tmp_path)
    data_loader.load_split(cfg, "train")
    cache_dir = os.path.join(cfg.dataset_root, ".tensor_cache")
    (first,) = [f for f in os.listdir(cache_dir) if f.startswith("imagefolder_train_")]
    img = os.path.join(cfg.dataset_root, "train", "circle", "0000.png")
    os.utime(img, ns=(os.stat(img).st_atime_ns, os.stat(img).st_mtime_ns + 10 ** 9))
    with warnings.catch_warnings(record=True):
        data_loader.load_split(cfg, "train")
    now = [f for f in os.listdir(cache_dir) if f.startswith("imagefolder_train_")]
    assert len(now) == 1 and now != [first]
    cached = torch.load(os.path.join(cache_dir, now[0]), weights_only=True)
    assert cached["images"].dtype == torch.uint8


def test_killed_teacher_cache_builds_of_any_key_are_removed(tmp_path):
    """Issue 17.11 for the teacher cache: a build killed under another key (the data changed since)
    is never finished by anyone; a recent one may still be writing."""
    import teacher_cache
    root = tmp_path / "teacher_cache"
    stale, recent = root / ".tmp_otherkey_1", root / ".tmp_otherkey_2"
    for folder in (stale, recent):
        folder.mkdir(parents=True)
        (folder / "targets.bin").write_bytes(b"x" * 1000)
    past = time.time() - 2 * teacher_cache.STALE_BUILD_S
    for path in (stale / "targets.bin", stale):
        os.utime(path, (past, past))
    assert teacher_cache._remove_killed_builds(str(root), "thiskey") == 1000
    assert not stale.exists() and recent.exists()
