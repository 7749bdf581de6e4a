from __future__ import annotations

import os

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint, strip_prefixes
from config import UserError


def test_strip_prefixes_any_order():
    sd = {"module._orig_mod.blocks.0.w": 1, "_orig_mod.module.norm.b": 2, "cls_token": 3}
    assert strip_prefixes(sd) == {"blocks.0.w": 1, "norm.b": 2, "cls_token": 3}


def test_round_trip_weights_only(tmp_path):
    path = str(tmp_path / "c.pth")
    state = {"student": {"w": torch.randn(3)}, "epoch": 2, "config": {"data": {"x": None}},
             "rng": {"torch": torch.get_rng_state()}}
    save_checkpoint(state, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["student"]["w"], state["student"]["w"]) and loaded["epoch"] == 2
    assert os.listdir(tmp_path) == ["c.pth"]  # no temp file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_one_line(tmp_path, damage):
    path = str(tmp_path / "c.pth")
    save_checkpoint({"student": {"w": torch.randn(1000)}}, path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(
            {"truncate": data[: len(data) // 2], "garbage": bytes(range(256)) * 10, "empty": b""}[
                damage
            ]
        )
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert (
        "\n" not in str(e.value) and path in str(e.value) and "truncated or corrupt" in str(e.value)
    )


@pytest.mark.parametrize(
    "text", ["hello", "batch_size: 64\nnum_epochs: 3\n", "not a checkpoint" * 10]
)
def test_text_file_as_checkpoint_is_one_line(tmp_path, text):
    """torch.load raises KeyError / IndexError on text: still one line, saying what the file
    holds."""
    path = tmp_path / "checkpoint_latest.pth"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_checkpoint(str(path))
    message = str(e.value)
    assert (
        "\n" not in message
        and str(path) in message
        and "is not a checkpoint: it holds text" in message
    )
    assert " ".join(text.split())[:20] in message


def test_written_files_take_the_umask(tmp_path):
    """Checkpoints are shared on clusters: the mode comes from the umask (mkstemp alone would give
    0600)."""
    previous = os.umask(0o022)
    try:
        save_checkpoint({"epoch": 1}, str(tmp_path / "a.pth"))
        os.umask(0o002)
        save_checkpoint({"epoch": 1}, str(tmp_path / "b.pth"))
    finally:
        os.umask(previous)
    assert (
        os.stat(tmp_path / "a.pth").st_mode & 0o777,
        os.stat(tmp_path / "b.pth").st_mode & 0o777,
    ) == (0o644, 0o664)


def test_failed_first_write_leaves_no_empty_folders(tmp_path, monkeypatch):
    def disk_full(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        save_checkpoint({"epoch": 1}, str(tmp_path / "a" / "b" / "c.pth"))
    assert os.listdir(tmp_path) == []


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pth"))


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pth")
    save_checkpoint({"epoch": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="previous file is untouched"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["c.pth"]
