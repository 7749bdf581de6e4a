"""One decoder for every image source: each PIL mode and bit depth ends as uint8 RGB, scaled, and
is cached."""
from __future__ import annotations

import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
from config import DataConfig, UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def png16(path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), written chunk by chunk."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (8, 8, 3)).astype(np.uint8)
GREY16 = RNG.integers(0, 65536, (8, 8)).astype(np.uint16)
RGB16 = RNG.integers(0, 65536, (8, 8, 3)).astype(np.uint16)


def grey(a):
    return np.repeat(a[..., None], 3, axis=2)


def write(mode: str, path_stem: str):
    """(file path, expected uint8 [H, W, 3], tolerance) for an image stored in `mode`."""
    if mode == "rgb16":
        path = path_stem + ".png"
        png16(path, RGB16)
        return path, (RGB16 >> 8).astype(np.uint8), 0
    if mode == "I;16":
        path = path_stem + ".png"
        Image.fromarray(GREY16).save(path)
        return path, grey((GREY16 >> 8).astype(np.uint8)), 0
    im = Image.fromarray(RGB8)
    if mode == "RGBA":
        im.putalpha(128)
    elif mode == "P":
        im = im.quantize(16)
    elif mode != "RGB":
        im = im.convert(mode)
    expected = np.array(im.convert("RGB"))
    ext = ".jpg" if mode == "CMYK" else ".png"
    if mode == "RGB":
        ext = ".bmp"  # a format torchvision's decoder lacks: the PIL path
    path = path_stem + ext
    im.save(path, quality=100) if ext == ".jpg" else im.save(path)
    return path, expected, 12 if ext == ".jpg" else 0


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "rgb16"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_decodes_to_scaled_uint8_rgb(mode, tmp_path):
    path, expected, tol = write(mode, str(tmp_path / "img"))
    img = data_loader._decode_file(path)
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 8, 8)
    diff = np.abs(img.permute(1, 2, 0).numpy().astype(int) - expected.astype(int)).max()
    assert diff <= tol, (mode, diff)


def test_pil_path_scales_16_bit_grey(tmp_path):
    """The PIL fallback (no torchvision decoder) must scale 16-bit too, not clip at 255."""
    path, expected, _ = write("I;16", str(tmp_path / "img"))
    with Image.open(path) as im:
        assert im.mode.startswith("I")
        img = data_loader._pil_rgb8(im)
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(expected))


def test_float_image_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "f.tif")
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    with pytest.raises(UserError, match=r"f\.tif: cannot decode image .*convert it to 8-bit RGB"):
        data_loader._decode_file(path)


@pytest.mark.parametrize("dataset_name", ["imagefolder", "folder"])
def test_16_and_8_bit_mixed_folder_trains_on_uint8_and_caches(dataset_name, tmp_path):
    """Issue 17.1: 16-bit PNGs beside 8-bit ones, for the labelled and the unlabelled source; the
    cache written on the first load is read back on the second (no 'corrupt, rebuilding')."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                stem = str(folder / f"{i}")
                if i == 0:
                    png16(stem + ".png", RGB16)
                else:
                    Image.fromarray(RGB8).save(stem + ".png")
    cfg = DataConfig(dataset_name=dataset_name, dataset_root=str(root), num_workers=0,
                     download=False)
    images, _, _ = data_loader.load_split(cfg, "train")
    assert images.dtype == torch.uint8 and int(images.max()) <= 255
    values = {tuple(img.flatten()[:6].tolist()) for img in images}
    high_bytes = torch.from_numpy((RGB16 >> 8).astype(np.uint8)).permute(2, 0, 1)
    assert tuple(high_bytes.flatten()[:6].tolist()) in values
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 'tensor cache is corrupt' warning fails the test
        again, _, _ = data_loader.load_split(cfg, "train")
    assert torch.equal(images, again)
    assert os.listdir(root / ".tensor_cache")
