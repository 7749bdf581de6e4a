"""Teacher-view cache (teacher_cache.py): views regenerate from seeds, targets match the live
teacher, the key rebuilds on a config change and is reused otherwise, and cached training learns and
resumes exactly (CPU)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import distill_trainer
import teacher_cache
from distill_loss import DistillLoss
from distributed import DistInfo
from helpers import tiny_config, tiny_overrides
from transforms import model_inputs

CACHED = {"train.cache_teacher_features": True, "train.teacher_cache_views": 2}
# A plain (non-DINOv2) tiny ViT teacher: without LayerScale its random features still vary with the
# input.
VARIED_TEACHER = {"model.teacher_name": "vit_small_patch16_224"}


def build(tmp_path, synthetic_root, **extra):
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"), **{**CACHED, **extra})
    return distill_trainer.build_run(cfg, DistInfo(), torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def count_builds(monkeypatch):
    calls = []
    real = teacher_cache.build_cache

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(teacher_cache, "build_cache", counting)
    return calls


def test_same_seed_same_views():
    a = teacher_cache.view_params(40, 3, seed=5, minimal=False, blur_prob=0.5)
    assert a.shape == (3, 40, 6)
    assert torch.equal(a, teacher_cache.view_params(40, 3, seed=5, minimal=False, blur_prob=0.5))
    assert not torch.equal(a[0], a[1])  # the K views of an image differ
    assert not torch.equal(
        a, teacher_cache.view_params(40, 3, seed=6, minimal=False, blur_prob=0.5)
    )
    v = teacher_cache.epoch_views(40, 3, seed=5, epoch=2)
    assert torch.equal(v, teacher_cache.epoch_views(40, 3, seed=5, epoch=2)) and set(
        v.tolist()
    ) == {0, 1, 2}
    assert not torch.equal(v, teacher_cache.epoch_views(40, 3, seed=5, epoch=3))


def live_targets(run, images, params, pool):
    _, teacher_x = model_inputs(
        images, params, run.cfg.model.student_img_size, run.cfg.model.teacher_img_size
    )
    t_cls, t_patch = run.teacher(teacher_x)
    return torch.cat([t_cls[:, None], pool.pool_teacher(t_patch)], dim=1)


def test_cached_targets_equal_live_teacher_on_the_regenerated_view(tmp_path, synthetic_root):
    run = build(tmp_path, synthetic_root, **{"train.blur_prob": 0.5})
    cache, cfg = run.teacher_cache, run.cfg
    n, k, tokens, dim = cache.targets.shape
    # 24 px / patch 8 -> 3x3 grid
    assert (n, k, tokens, dim) == (len(run.data.train_images), 2, 1 + 3 * 3, 32)
    pool = DistillLoss(32, 32, (3, 3), run.teacher.grid_size, {"cls": 1.0, "patch": 1.0})
    idx = torch.tensor([0, 7, n - 1])
    for view in range(k):  # views regenerated from (seed, k) alone
        params = teacher_cache.view_params(n, k, cfg.train.seed, False, 0.5)[view, idx]
        expected = live_targets(run, run.data.train_images[idx], params, pool)
        # bf16 storage
        torch.testing.assert_close(cache.targets[idx, view].float(), expected, rtol=1e-2, atol=1e-2)
    # What a training step gets: the epoch's (params, targets) pair describes the same view of the
    # same image.
    indices, params, targets = distill_trainer.epoch_batches(run, 3)
    expected = live_targets(run, run.data.train_images[indices[1]], params[1], pool)
    torch.testing.assert_close(targets[1].float(), expected, rtol=1e-2, atol=1e-2)
    # some views blurred: blur parameters are part of the regenerated view
    assert params[:, :, 5].gt(0).any()


def test_pooled_targets_give_the_live_loss():
    torch.manual_seed(0)
    s_cls, s_patch = torch.randn(4, 16), torch.randn(4, 9, 16)
    t_cls, t_patch = torch.randn(4, 24), torch.randn(4, 16, 24)
    live = DistillLoss(16, 24, (3, 3), (4, 4), {"cls": 1.0, "patch": 0.5})
    cached = DistillLoss(16, 24, (3, 3), (4, 4), {"cls": 1.0, "patch": 0.5}, pooled_targets=True)
    a = live(s_cls, s_patch, t_cls, t_patch)
    b = cached(s_cls, s_patch, t_cls, live.pool_teacher(t_patch))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_config_change_rebuilds_unchanged_config_reuses(
    tmp_path, synthetic_root, count_builds, monkeypatch
):
    first = build(tmp_path, synthetic_root).teacher_cache
    directories = {first.directory}
    for change in (
        {"model.teacher_img_size": 40},
        {"train.blur_prob": 0.5},
        {"train.teacher_cache_views": 3},
    ):
        directories.add(build(tmp_path, synthetic_root, **change).teacher_cache.directory)
    assert len(count_builds) == 4 and len(directories) == 4

    def refuse(*args, **kwargs):
        raise AssertionError("an unchanged config must reuse the cache, not run the teacher")
    monkeypatch.setattr(teacher_cache, "build_cache", refuse)
    again = build(tmp_path, synthetic_root).teacher_cache
    assert again.directory == first.directory and torch.equal(again.targets, first.targets)
    meta = json.load(open(os.path.join(first.directory, "meta.json")))
    assert meta["shape"] == list(first.targets.shape) and meta["key_hash"] == os.path.basename(
        first.directory
    )
    assert not [e for e in os.listdir(os.path.dirname(first.directory)) if e.startswith(".tmp")]


def test_truncated_cache_is_rebuilt_and_killed_builds_removed(
    tmp_path, synthetic_root, count_builds
):
    first = build(tmp_path, synthetic_root).teacher_cache
    directory, expected = first.directory, first.targets.clone()
    del first
    with open(os.path.join(directory, "targets.bin"), "r+b") as f:
        f.truncate(100)  # as a copy cut short would leave it
    killed = os.path.join(os.path.dirname(directory), f".tmp_{os.path.basename(directory)}_killed")
    os.makedirs(killed)
    with open(os.path.join(killed, "targets.bin"), "wb") as f:
        f.write(b"x" * 100)
    an_hour_ago = os.path.getmtime(killed) - 3600
    for path in (os.path.join(killed, "targets.bin"), killed):
        os.utime(path, (an_hour_ago, an_hour_ago))
    again = build(tmp_path, synthetic_root).teacher_cache
    assert (
        len(count_builds) == 2
        and torch.equal(again.targets, expected)
        and not os.path.exists(killed)
    )


def read_log(run_dir):
    """The epoch records of log.jsonl (event lines such as "resumed" left out)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [record for record in map(json.loads, f) if "epoch" in record]


def train(tmp_path, synthetic_root, name, extra):
    run_dir = str(tmp_path / name)
    code = distill_trainer.main(["--override", *tiny_overrides(synthetic_root, run_dir, **extra)])
    assert code == 0
    return run_dir


def test_cached_training_learns_and_resumes_exactly(tmp_path, synthetic_root, count_builds):
    extra = {
        **CACHED,
        **VARIED_TEACHER,
        "train.num_epochs": 4,
        "train.save_epochs": [4],
        "train.max_steps_per_epoch": 3,
        "train.learning_rate": 2e-3,
        "model.target_norm": "standardize",
    }
    straight = train(tmp_path, synthetic_root, "straight", extra)
    split = train(tmp_path, synthetic_root, "split", {**extra, "train.stop_after_epoch": 2})
    train(tmp_path, synthetic_root, "split", extra)
    assert len(count_builds) == 1  # the three invocations share one cache
    log = read_log(straight)
    assert (
        log[-1]["loss"] < log[1]["loss"]
        and log[-1]["student_teacher_cos"] > log[0]["student_teacher_cos"]
    ), log
    a = torch.load(os.path.join(straight, "checkpoint_epoch_4.pth"), weights_only=True)
    b = torch.load(os.path.join(split, "checkpoint_epoch_4.pth"), weights_only=True)
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    assert [r["loss"] for r in read_log(split)][1:] == [r["loss"] for r in log][1:]
