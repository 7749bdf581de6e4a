"""Data loading: image folders decode to the right labels, the tensor cache is reused and
invalidated, every user mistake is one actionable line, and the epoch plan is the same batches
whatever the number of GPUs."""
from __future__ import annotations

import os
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
from config import DataConfig, UserError
from data_loader import epoch_indices, load_split, stratified_subset

CLASSES = ["zebra", "ant", "moth"]  # created unsorted on purpose
SIZE = 8


def _write_image(path, value, fmt="PNG"):
    # Pixel value encodes the label (class index * 60 + image index) so the test can check labels
    # from content.
    arr = np.full((SIZE, SIZE, 3), value, dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def _make_folder(root, per_class=(4, 2), classes=CLASSES):
    """root/{train,test}/<class>/ with PNGs (exact pixels) plus one JPEG per train class (decode
    path coverage)."""
    sorted_classes = sorted(classes)
    for split, n in zip(("train", "test"), per_class):
        for name in classes:
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                _write_image(d / f"{i:03d}.png", sorted_classes.index(name) * 60 + i)
            if split == "train":
                _write_image(d / "zzz.JPG", sorted_classes.index(name) * 60 + 50, fmt="JPEG")
    return root


def _cfg(root, **kw):
    kw.setdefault("cache_dir", str(root.parent / "cache"))
    kw.setdefault("num_workers", 0)
    return DataConfig(
        dataset_name=kw.pop("dataset_name", "imagefolder"), dataset_root=str(root), **kw
    )


def _assert_one_line(err, *needles):
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, msg


@pytest.mark.parametrize("num_workers", [0, 2])
def test_imagefolder_shapes_labels_and_sorted_classes(tmp_path, num_workers):
    root = _make_folder(tmp_path / "ds")
    images, labels, classes = load_split(_cfg(root, num_workers=num_workers), "train")
    assert classes == sorted(CLASSES)
    assert (
        images.dtype == torch.uint8
        and images.shape == (3 * 5, 3, SIZE, SIZE)
        and images.is_contiguous()
    )
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    # Pixel values encode the class, so each label really names the folder its image came from.
    assert torch.equal(images[:, 0, 0, 0].long() // 60, labels)
    test_images, test_labels, test_classes = load_split(_cfg(root, num_workers=num_workers), "test")
    assert (
        test_classes == classes
        and test_images.shape[0] == 6
        and test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    )


def test_cache_is_reused_then_rebuilt_when_files_change(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "ds")
    cfg = _cfg(root)
    first = load_split(cfg, "train")
    cache_files = os.listdir(cfg.cache_dir)
    assert len(cache_files) == 1 and cache_files[0].startswith("imagefolder_train_")

    def no_decode(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(data_loader, "_decode_file", no_decode)
        second = load_split(cfg, "train")
    assert (
        torch.equal(first[0], second[0])
        and torch.equal(first[1], second[1])
        and first[2] == second[2]
    )

    _write_image(root / "train" / "ant" / "new.png", 77)  # an added file
    added = load_split(cfg, "train")
    assert added[0].shape[0] == first[0].shape[0] + 1

    path = root / "train" / "ant" / "000.png"  # same name, same size, new content and mtime
    _write_image(path, 99)
    later = time.time() + 10
    os.utime(path, (later, later))
    changed = load_split(cfg, "train")
    assert changed[0][0, 0, 0, 0].item() == 99


def test_corrupt_cache_is_rebuilt(tmp_path):
    root = _make_folder(tmp_path / "ds")
    cfg = _cfg(root)
    expected = load_split(cfg, "train")
    (cache_file,) = [os.path.join(cfg.cache_dir, f) for f in os.listdir(cfg.cache_dir)]
    with open(cache_file, "wb") as f:
        f.write(b"not a torch file")
    with pytest.warns(UserWarning, match="corrupt"):
        again = load_split(cfg, "train")
    assert torch.equal(again[0], expected[0])
    # rewritten
    assert torch.load(cache_file, weights_only=True)["images"].shape == expected[0].shape


def test_unwritable_cache_dir_warns_and_continues(tmp_path):
    root = _make_folder(tmp_path / "ds")
    blocker = tmp_path / "a_file"
    # a folder cannot be created under a file, even as root (chmod would not stop root)
    blocker.write_text("x")
    cfg = _cfg(root, cache_dir=str(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot write the tensor cache"):
        images, labels, _ = load_split(cfg, "train")
    assert images.shape[0] == 15 and labels.shape == (15,)


def test_default_cache_dir_is_under_dataset_root(tmp_path):
    root = _make_folder(tmp_path / "ds")
    load_split(_cfg(root, cache_dir=None), "test")
    assert any(f.startswith("imagefolder_test_") for f in os.listdir(root / ".tensor_cache"))


def test_max_samples_is_stratified_and_deterministic(tmp_path):
    root = _make_folder(tmp_path / "ds", per_class=(10, 3))
    cfg = _cfg(root, max_samples=6)
    images, labels, _ = load_split(cfg, "train")
    assert images.shape[0] == 6 and torch.bincount(labels).tolist() == [2, 2, 2]
    again_images, again_labels, _ = load_split(cfg, "train")
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    _, test_labels, _ = load_split(cfg, "test")
    assert torch.bincount(test_labels).tolist() == [2, 2, 2]
    _, all_test, _ = load_split(_cfg(root, max_samples=100), "test")  # min(N, len)
    assert len(all_test) == 9


def test_stratified_subset_unbalanced_counts():
    labels = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    keep = stratified_subset(labels, 10)
    assert torch.bincount(labels[keep]).tolist() == [7, 2, 1]
    assert torch.equal(keep, stratified_subset(labels, 10)) and torch.equal(
        keep, keep.sort().values
    )
    assert (
        len(stratified_subset(labels, 11)) == 11
        and len(set(stratified_subset(labels, 11).tolist())) == 11
    )


def _no_test_dir(root):
    _make_folder(root)
    shutil.rmtree(root / "test")
    return root / "test"


def _empty_class(root):
    _make_folder(root)
    for f in (root / "train" / "moth").iterdir():
        f.unlink()
    return root / "train" / "moth"


def _no_class_folders(root):
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    return root / "train"


def _corrupt_image(root):
    _make_folder(root)
    bad = root / "train" / "ant" / "001.png"
    bad.write_bytes(b"\x89PNG garbage")
    return bad


def _mismatched_classes(root):
    _make_folder(root)
    (root / "test" / "zebra").rename(root / "test" / "horse")
    return "horse"


def _odd_size(root):
    _make_folder(root)
    odd = root / "train" / "moth" / "001.png"
    Image.fromarray(np.zeros((SIZE + 1, SIZE, 3), dtype=np.uint8)).save(odd)
    return odd


@pytest.mark.parametrize(
    "make_broken",
    [
        lambda root: root,  # missing root: nothing is created
        _no_test_dir, _empty_class, _no_class_folders, _corrupt_image, _mismatched_classes,
        _odd_size,
    ],
    ids=[
        "missing_root", "no_test_dir", "empty_class", "no_class_folders", "corrupt_image",
        "class_mismatch", "odd_size",
    ],
)
def test_imagefolder_errors_are_one_line_naming_the_path(tmp_path, make_broken):
    root = tmp_path / "ds"
    named = make_broken(root)
    with pytest.raises(UserError) as err:
        load_split(_cfg(root, num_workers=2), "train")
    _assert_one_line(err, named)


@pytest.fixture
def offline(monkeypatch):
    """No network for this test, whatever the machine: name resolution fails at once, as on a
    compute node."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize(
    "name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
@pytest.mark.parametrize("download", [False, True])
def test_offline_cifar_is_one_line_with_advice(tmp_path, offline, name, folder, download):
    root = tmp_path / "torchvision_root"
    start = time.time()
    with pytest.raises(UserError) as err:
        load_split(_cfg(root, dataset_name=name, download=download), "train")
    assert time.time() - start < 30
    _assert_one_line(err, folder, os.path.abspath(root), "data.download=true", "imagefolder")
    assert socket.getdefaulttimeout() is None  # the download timeout is restored


def test_epoch_indices_cover_a_permutation_and_drop_the_last_batch():
    idx = epoch_indices(100, 10, 1, 0, seed=0, epoch=0)
    assert idx.shape == (10, 10) and idx.dtype == torch.int64
    assert torch.equal(idx.flatten().sort().values, torch.arange(100))
    idx = epoch_indices(105, 10, 1, 0, seed=0, epoch=0)
    assert idx.shape == (10, 10) and len(set(idx.flatten().tolist())) == 100
    assert epoch_indices(105, 10, 1, 0, seed=0, epoch=0, max_steps=3).shape == (3, 10)


def test_epoch_indices_seeding():
    a = epoch_indices(64, 8, 1, 0, seed=0, epoch=0)
    assert torch.equal(a, epoch_indices(64, 8, 1, 0, seed=0, epoch=0))
    assert not torch.equal(a, epoch_indices(64, 8, 1, 0, seed=0, epoch=1))
    assert not torch.equal(a, epoch_indices(64, 8, 1, 0, seed=1, epoch=0))
    assert not torch.equal(
        epoch_indices(64, 8, 1, 0, seed=0, epoch=1), epoch_indices(64, 8, 1, 0, seed=1, epoch=0)
    )


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_together_see_the_single_gpu_batches(world_size):
    single = epoch_indices(1000, 4 * world_size, 1, 0, seed=5, epoch=2, max_steps=20)
    per_rank = [
        epoch_indices(1000, 4, world_size, r, seed=5, epoch=2, max_steps=20)
        for r in range(world_size)
    ]
    assert all(p.shape == (20, 4) for p in per_rank)
    assert torch.equal(torch.cat(per_rank, dim=1), single)
    assert not set(per_rank[0].flatten().tolist()) & set(per_rank[1].flatten().tolist())


def test_epoch_indices_too_few_samples_is_a_user_error():
    with pytest.raises(UserError) as err:
        epoch_indices(10, 8, 2, 0, seed=0, epoch=0)
    _assert_one_line(err, "train.batch_size")


def test_bmp_and_webp_decode_like_png(tmp_path):
    # BMP is not in torchvision's decoder: it goes through the PIL fallback.
    root = tmp_path / "ds"
    for split in ("train", "test"):
        d = root / split / "only"
        d.mkdir(parents=True)
        _write_image(d / "a.png", 10)
        _write_image(d / "b.BMP", 20, fmt="BMP")
        Image.fromarray(np.full((SIZE, SIZE, 3), 30, dtype=np.uint8)).save(
            d / "c.webp", lossless=True
        )
        (d / "notes.txt").write_text("not an image")  # other files are ignored
    images, labels, classes = load_split(_cfg(root), "train")
    assert classes == ["only"] and images[:, 0, 0, 0].tolist() == [10, 20, 30]


def test_images_in_sub_folders_and_dangling_links_are_counted_in_one_warning(tmp_path, recwarn):
    """Only <split>/<class>/<image> is read: what is skipped is said once, counted (issue 13, item
    17)."""
    import warnings
    root = _make_folder(tmp_path / "ds")
    nested = root / "train" / "ant" / "more" / "deeper"
    nested.mkdir(parents=True)
    for i in range(3):
        _write_image(nested / f"{i}.png", 0)
    (root / "train" / "moth" / "notes.txt").write_text("not an image, not counted")
    os.symlink(tmp_path / "gone.png", root / "train" / "zebra" / "link.png")
    warnings.simplefilter("always")
    images, _, _ = load_split(_cfg(root), "train")
    assert len(images) == 15  # 3 classes x (4 PNG + 1 JPEG), as without the extras
    messages = [str(w.message) for w in recwarn if "skipped" in str(w.message)]
    assert messages == [
        f"{root / 'train'}: skipped 3 images in sub-folders of class folders (e.g. "
        f"{nested}/{sorted(os.listdir(nested))[0]}) and 1 dangling symlinks (e.g. "
        f"{root / 'train' / 'zebra' / 'link.png'}); only images directly in train/<class>/ are read"
    ]
    recwarn.clear()
    load_split(_cfg(root), "test")  # nothing skipped there: no warning
    assert not [w for w in recwarn if "skipped" in str(w.message)]
