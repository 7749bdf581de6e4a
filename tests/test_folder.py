"""dataset_name: folder — every image below a root, unlabelled, for distillation on another
distribution."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
import distill_trainer
import evaluate_checkpoints as ev
from config import ConfigError, DataConfig, UserError
from data_loader import load_split
from helpers import tiny_config, tiny_overrides


def _write(path, value, size=(12, 12), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[0], size[1], 3), value, dtype=np.uint8)).save(path, format=fmt)


def make_folder(root, n=30, size=(12, 12)):
    """Nested folders, mixed formats (png, jpg, jpeg, webp), a hidden folder and a non-image
    file."""
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("JPEG", "JPEG"), ("webp", "WEBP")]
    for i in range(n):
        ext, fmt = formats[i % 4]
        sub = ("a", "a/b/c", "d")[i % 3]
        _write(os.path.join(root, sub, f"{i:03d}.{ext}"), (8 * i) % 256, size, fmt)
    _write(os.path.join(root, ".hidden", "skip.png"), 255, size)
    with open(os.path.join(root, "a", "notes.txt"), "w") as f:
        f.write("not an image")
    return str(root)


def cfg(root, **kw):
    kw.setdefault("cache_dir", os.path.join(os.path.dirname(str(root)), "cache"))
    kw.setdefault("num_workers", 0)
    return DataConfig(dataset_name="folder", dataset_root=str(root), **kw)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_reads_nested_mixed_formats_and_holds_out_a_fixed_subset(tmp_path, num_workers):
    root = make_folder(tmp_path / "ds")
    train, train_labels, classes = load_split(cfg(root, num_workers=num_workers), "train")
    test, test_labels, _ = load_split(cfg(root, num_workers=num_workers), "test")
    assert classes == [] and train.dtype == torch.uint8 and train.shape[1:] == (3, 12, 12)
    # 10 % held out for diagnostics, at least 2
    assert len(train) + len(test) == 30 and len(test) == 3
    assert not train_labels.any() and not test_labels.any()
    # every file read once (pixel values are 8 * i; lossy formats move them by a few levels): none
    # twice, no .hidden
    values = sorted(torch.cat([train, test])[:, 0].float().mean((1, 2)).round().tolist())
    assert all(abs(v - 8 * i) <= 4 for i, v in enumerate(values)), values
    assert len(load_split(cfg(root), "test")[0]) == 3 and torch.equal(
        load_split(cfg(root), "test")[0], test
    )


def test_folder_mixed_sizes_one_line_naming_two_files_and_the_fix(tmp_path):
    root = make_folder(tmp_path / "ds")
    odd = os.path.join(root, "d", "zzz_odd.png")
    _write(odd, 3, size=(20, 16))
    with pytest.raises(UserError) as err:
        load_split(cfg(root), "train")
    message = str(err.value)
    assert "\n" not in message and odd in message and os.path.join(root, "a") in message
    assert "data.source_size" in message
    # with source_size every image is stored at that size: shorter side resized, centre crop
    images, _, _ = load_split(cfg(root, source_size=8), "train")
    assert images.shape[1:] == (3, 8, 8)


def test_folder_source_size_resizes_and_centre_crops():
    img = torch.zeros(3, 20, 40, dtype=torch.uint8)
    img[:, :, 10:30] = 200  # the centre half is bright
    out = data_loader._square(img, 10)
    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8
    assert out.float().mean() > 190  # the centre crop of the 10 x 20 resize is the bright part


@pytest.mark.parametrize("case", ["unreadable", "missing_root", "no_images"])
def test_folder_mistakes_are_one_line_naming_the_path(tmp_path, case):
    root = tmp_path / "ds"
    if case == "unreadable":
        make_folder(root)
        named = root / "a" / "b" / "c" / "broken.jpg"
        named.write_bytes(b"\xff\xd8 not a jpeg")
    elif case == "no_images":
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "readme.txt").write_text("x")
        named = root
    else:
        named = root
    with pytest.raises(UserError) as err:
        load_split(cfg(root, num_workers=2), "train")
    assert "\n" not in str(err.value) and str(named) in str(err.value), str(err.value)


def test_supervised_objective_refuses_folder_and_source_size_needs_folder(tmp_path, synthetic_root):
    with pytest.raises(ConfigError) as err:
        tiny_config(str(tmp_path), str(tmp_path / "r"), **{"data.dataset_name": "folder",
                                                           "train.objective": "supervised"})
    assert (
        "\n" not in str(err.value)
        and "no labels" in str(err.value)
        and "supervised" in str(err.value)
    )
    with pytest.raises(ConfigError) as err:
        tiny_config(synthetic_root, str(tmp_path / "r"), **{"data.source_size": 32})
    assert "'data.source_size'" in str(err.value) and "folder" in str(err.value)


def test_distillation_trains_on_a_folder_and_the_evaluator_asks_for_labels(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", n=40, size=(40, 40))
    run_dir = str(tmp_path / "run")
    extra = {
        "data.dataset_name": "folder",
        "data.cache_dir": str(tmp_path / "cache"),
        "train.batch_size": 8,
        "train.num_epochs": 1,
        "train.save_epochs": [1],
        "model.teacher_name": "vit_small_patch16_224",
    }
    assert distill_trainer.main(["--override", *tiny_overrides(root, run_dir, **extra)]) == 0
    ckpt = torch.load(os.path.join(run_dir, "checkpoint_epoch_1.pth"), weights_only=True)
    assert (
        ckpt["config"]["data"]["dataset_name"] == "folder"
        and ckpt["scheduler"]["num_train_images"] == 36
    )
    capsys.readouterr()
    assert ev.main(["--checkpoint_dir", run_dir, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: data.dataset_name=folder")
        and "--data_config" in err
        and "\n" not in err
    )


def test_target_statistics_come_from_augmented_views(tmp_path, synthetic_root):
    """target_norm statistics: one augmented view per image, drawn as in training from a seeded
    stream."""
    from distributed import DistInfo
    from transforms import model_inputs
    config = tiny_config(
        synthetic_root,
        str(tmp_path / "r"),
        **{
            "model.target_norm": "standardize",
            "model.teacher_name": "vit_small_patch16_224",
            "train.blur_prob": 0.5,
        },
    )
    run = distill_trainer.build_run(config, DistInfo(), torch.device("cpu"))
    distill_trainer.estimate_target_stats(run)
    criterion = run.trainable.criterion
    images = run.data.train_images  # 96 images: all of them, in order (the subset is sorted)
    params = distill_trainer.target_stats_views(config, len(images))
    # crops, flips, blur
    assert params[:, 2].min() < 0.9 and params[:, 4].sum() > 0 and (params[:, 5] > 0).any()
    assert torch.equal(params, distill_trainer.target_stats_views(config, len(images)))  # seeded
    with torch.no_grad():
        _, teacher_x = model_inputs(images, params, 24, 32, blur=True)
        t_cls, _ = run.teacher(teacher_x)
    torch.testing.assert_close(criterion.cls_mean, t_cls.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        criterion.cls_std, t_cls.std(0).clamp(min=1e-6), rtol=1e-4, atol=1e-5
    )
    with torch.no_grad():  # the un-augmented statistics (the earlier rule) differ
        _, identity_x = model_inputs(
            images, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]).repeat(len(images), 1), 24, 32
        )
        assert not torch.allclose(criterion.cls_mean, run.teacher(identity_x)[0].mean(0), atol=1e-4)
