"""Teacher: shapes, frozen-ness, every weights format, and the one-line errors a user sees (CPU, no
network)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import Config, DataConfig, ModelConfig, TrainConfig, UserError
from dinov2_patcher import build_teacher
from helpers import REPO
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
OFFICIAL_GRID = 37  # 518 px / 14: every released DINOv2 checkpoint stores this pos_embed grid


def tiny_cfg(**overrides) -> ModelConfig:
    # 56 px / 14 -> a 4x4 teacher grid; teacher_kwargs override the dinov2 defaults (dim 384, 12
    # blocks).
    values = dict(teacher_name="dinov2_vits14", teacher_img_size=56, teacher_pretrained=False,
                  teacher_kwargs=dict(TINY))
    values.update(overrides)
    return ModelConfig(**values)


def quiet_build(cfg: ModelConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init banner is tested once, on its own
        return build_teacher(cfg, "cpu")


def official_state_dict(dim=32, depth=2, reg=False, giant=False, chunked=False, seed=0):
    """Random tensors under the key names of dl.fbaipublicfiles.com/dinov2/*_pretrain.pth, written
    by hand."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + OFFICIAL_GRID**2, dim),
        "mask_token": r(1, dim),
        "patch_embed.proj.weight": r(dim, 3, 14, 14),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": r(dim),
        "norm.bias": r(dim),
    }
    if reg:
        sd["register_tokens"] = r(1, 4, dim)
    # timm's SwiGLUPacked width for the giant recipe
    hidden = int(dim * 2.66667 * 2) // 2 if giant else 4 * dim
    for i in range(depth):
        p = f"blocks.0.{i}." if chunked else f"blocks.{i}."
        sd.update({
            p + "norm1.weight": r(dim),
            p + "norm1.bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim),
            p + "attn.qkv.bias": r(3 * dim),
            p + "attn.proj.weight": r(dim, dim),
            p + "attn.proj.bias": r(dim),
            p + "ls1.gamma": r(dim),
            p + "norm2.weight": r(dim),
            p + "norm2.bias": r(dim),
            p + "ls2.gamma": r(dim),
        })
        if giant:
            sd.update({p + "mlp.w12.weight": r(2 * hidden, dim), p + "mlp.w12.bias": r(2 * hidden),
                       p + "mlp.w3.weight": r(dim, hidden), p + "mlp.w3.bias": r(dim)})
        else:
            sd.update({p + "mlp.fc1.weight": r(hidden, dim), p + "mlp.fc1.bias": r(hidden),
                       p + "mlp.fc2.weight": r(dim, hidden), p + "mlp.fc2.bias": r(dim)})
    return sd


def bicubic_grid(pos_tokens: torch.Tensor, size: int) -> torch.Tensor:
    """Expected resampling of [1, G*G, D] grid tokens, written with F.interpolate rather than timm's
    helper."""
    side = int(pos_tokens.shape[1] ** 0.5)
    grid = pos_tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return grid.permute(0, 2, 3, 1).reshape(1, size * size, -1)


def official_grid(pos_tokens: torch.Tensor, size: int, reg: bool) -> torch.Tensor:
    """facebookresearch/dinov2 `interpolate_pos_encoding` on [1, M*M, D] patch positions,
    re-implemented here from its description: register models (interpolate_offset 0,
    interpolate_antialias True) give an output size, the others (offset 0.1, antialias False) a
    scale factor (size + 0.1) / M per side."""
    m = int(math.sqrt(pos_tokens.shape[1]))
    grid = pos_tokens.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if reg:
        grid = F.interpolate(grid, mode="bicubic", antialias=True, size=(size, size))
    else:
        sx = sy = float(size + 0.1) / m
        grid = F.interpolate(grid, mode="bicubic", antialias=False, scale_factor=(sx, sy))
    assert grid.shape[-2:] == (size, size)
    return grid.permute(0, 2, 3, 1).reshape(1, size * size, -1)


# ----------------------------------------------------------------------------------- shapes, frozen
@pytest.mark.parametrize("name,num_prefix", [("dinov2_vits14", 1), ("dinov2_vits14_reg", 5)])
def test_output_shapes_drop_prefix_tokens(name, num_prefix):
    teacher = quiet_build(tiny_cfg(teacher_name=name))
    assert (teacher.embed_dim, teacher.grid_size, teacher.patch_size) == (32, (4, 4), 14)
    x = torch.randn(3, 3, 56, 56)
    cls, patches = teacher(x)
    assert cls.shape == (3, 32) and patches.shape == (3, 16, 32)
    # CLS, registers, then patches, after the final norm
    tokens = teacher.backbone.forward_features(x)
    assert tokens.shape[1] == num_prefix + 16
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patches, tokens[:, num_prefix:])
    assert "dinov2_vits14" in teacher.description and "4x4" in teacher.description


def test_random_teacher_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOM"):
        teacher = build_teacher(tiny_cfg(), "cpu")
    assert "RANDOM" in teacher.description


def test_teacher_frozen_and_outputs_usable_as_targets():
    teacher = quiet_build(tiny_cfg(teacher_kwargs=dict(TINY, drop_path_rate=0.5)))
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(4, 3, 56, 56)
    student = nn.Linear(32, 32)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    cls, patches = teacher(x)
    # mse_loss saves its target for backward: this fails if the teacher ran under
    # torch.inference_mode.
    loss = F.mse_loss(student(patches), patches) + F.mse_loss(student(cls), cls)
    loss.backward()
    opt.step()
    assert student.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    # eval mode kept: drop path (0.5) would make this random
    torch.testing.assert_close(teacher(x)[0], cls)


# ----------------------------------------------------------------------------------- weight formats
@pytest.mark.parametrize("reg", [False, True])
def test_official_dinov2_state_dict(tmp_path, reg):
    official = official_state_dict(reg=reg)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    name = "dinov2_vits14_reg" if reg else "dinov2_vits14"
    teacher = quiet_build(tiny_cfg(teacher_name=name, teacher_weights=str(path)))
    sd = teacher.backbone.state_dict()
    for key in (
        "blocks.1.attn.qkv.weight", "blocks.0.ls1.gamma", "blocks.1.mlp.fc2.weight", "norm.bias",
        "patch_embed.proj.weight",
    ):
        assert torch.equal(sd[key], official[key]), key
    pos = official["pos_embed"]
    if reg:  # timm's *_reg4 models keep no CLS position: it is folded into the CLS token
        assert torch.equal(sd["reg_token"], official["register_tokens"])
        torch.testing.assert_close(sd["cls_token"], official["cls_token"] + pos[:, 0])
        torch.testing.assert_close(
            sd["pos_embed"], official_grid(pos[:, 1:], 4, reg), atol=1e-5, rtol=1e-5
        )
    else:
        assert torch.equal(sd["cls_token"], official["cls_token"])
        assert sd["pos_embed"].shape == (1, 1 + 16, 32)
        torch.testing.assert_close(sd["pos_embed"][:, :1], pos[:, :1])
        torch.testing.assert_close(
            sd["pos_embed"][:, 1:], official_grid(pos[:, 1:], 4, reg), atol=1e-5, rtol=1e-5
        )
        # the official non-register rule is not timm's: the test would notice the old resampling
        assert not torch.allclose(sd["pos_embed"][:, 1:], bicubic_grid(pos[:, 1:], 4), atol=1e-3)
    assert str(path) in teacher.description


def test_official_giant_chunked_swiglu(tmp_path):
    official = official_state_dict(giant=True, chunked=True)
    path = tmp_path / "dinov2_vitg14_pretrain.pth"
    torch.save(official, path)
    teacher = quiet_build(tiny_cfg(teacher_name="dinov2_vitg14", teacher_weights=str(path)))
    block = teacher.backbone.blocks[1]
    assert torch.equal(block.attn.qkv.weight, official["blocks.0.1.attn.qkv.weight"])
    # DINOv2's SwiGLUFFNFused: x1, x2 = w12(x).chunk(2); w3(silu(x1) * x2)
    x = torch.randn(5, 32)
    x1, x2 = F.linear(
        x, official["blocks.0.1.mlp.w12.weight"], official["blocks.0.1.mlp.w12.bias"]
    ).chunk(2, -1)
    expected = F.linear(
        F.silu(x1) * x2, official["blocks.0.1.mlp.w3.weight"], official["blocks.0.1.mlp.w3.bias"]
    )
    torch.testing.assert_close(block.mlp(x), expected)


class OfficialForward(nn.Module):
    """What the torch.hub DinoVisionTransformer computes, re-implemented for the test: CLS + patch
    tokens plus the 37x37 position embedding interpolated at every forward by the official rule,
    registers inserted after the CLS token, the blocks, the final norm. Blocks and norm are timm
    modules holding the same weights."""

    def __init__(self, official, reg, img_size):
        super().__init__()
        name = "vit_small_patch14_reg4_dinov2" if reg else "vit_small_patch14_dinov2"
        self.vit = timm.create_model(
            name, pretrained=False, num_classes=0, img_size=img_size, **TINY
        ).eval()
        self.vit.load_state_dict(resample_to(official, self.vit))
        self.cls_token, self.pos_embed = official["cls_token"], official["pos_embed"]
        self.register_tokens = official.get("register_tokens")
        self.patch_size, self.embed_dim, self.num_register_tokens = (
            14,
            TINY["embed_dim"],
            4 if reg else 0,
        )

    def forward_features(self, x):
        b, grid = len(x), x.shape[-1] // self.patch_size
        t = torch.cat([self.cls_token.expand(b, -1, -1), self.vit.patch_embed(x)], dim=1)
        reg = self.num_register_tokens > 0
        t = t + torch.cat(
            [self.pos_embed[:, :1], official_grid(self.pos_embed[:, 1:], grid, reg)], dim=1
        )
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]], dim=1)
        for block in self.vit.blocks:
            t = block(t)
        t = self.vit.norm(t)
        return {
            "x_norm_clstoken": t[:, 0],
            "x_norm_patchtokens": t[:, 1 + self.num_register_tokens :],
        }


def resample_to(official, model):
    """The official weights in timm's layout for `model` (position embedding by whatever rule;
    blocks only matter)."""
    from dinov2_patcher import convert_official_dinov2, resample_pos_embed
    return resample_pos_embed(convert_official_dinov2(official, model), model, "timm")


@pytest.mark.parametrize("reg", [False, True])
def test_timm_file_timm_download_and_hub_give_the_same_tokens(tmp_path, monkeypatch, reg):
    """One set of random official-format weights through the three ways in: a weights file (timm),
    timm's download (at the native 37x37 grid, then the official rule) and torch.hub (official
    forward)."""
    import dinov2_patcher
    official = official_state_dict(reg=reg, seed=3)
    path = tmp_path / "official.pth"
    torch.save(official, path)
    name = "dinov2_vits14_reg" if reg else "dinov2_vits14"
    from_file = quiet_build(tiny_cfg(teacher_name=name, teacher_weights=str(path)))

    real_create = timm.create_model

    def download(model_name, pretrained=False, **kwargs):  # timm's pretrained load, without network
        model = real_create(model_name, pretrained=False, **kwargs)
        if pretrained:
            assert "img_size" not in kwargs and tuple(model.patch_embed.grid_size) == (
                OFFICIAL_GRID,
                OFFICIAL_GRID,
            )
            model.load_state_dict(dinov2_patcher.convert_official_dinov2(official, model))
        return model

    monkeypatch.setattr(timm, "create_model", download)
    monkeypatch.setattr(dinov2_patcher, "_hub_reachable", lambda: True)
    downloaded = quiet_build(tiny_cfg(teacher_name=name, teacher_pretrained=True))
    monkeypatch.setattr(timm, "create_model", real_create)
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: OfficialForward(official, reg, 56))
    hub = quiet_build(tiny_cfg(teacher_name=name, teacher_source="hub", teacher_pretrained=True))

    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    expected_pos = official_grid(official["pos_embed"][:, 1:], 4, reg)
    for teacher in (from_file, downloaded):
        torch.testing.assert_close(
            teacher.backbone.pos_embed[:, -16:], expected_pos, atol=1e-5, rtol=1e-5
        )
    reference = hub(x)
    for teacher in (from_file, downloaded):
        for got, want in zip(teacher(x), reference):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def trainer_checkpoint(tmp_path, student_img_size=32):
    model_cfg = ModelConfig(student_name="vit_small_patch16_224", student_img_size=student_img_size,
                            student_kwargs=dict(TINY))
    student = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                img_size=student_img_size, **TINY).eval()
    cfg = Config(DataConfig(image_size=student_img_size), TrainConfig(), model_cfg)
    # torch.compile wraps the module: a state dict saved from it carries `_orig_mod.` prefixes.
    state = {
        "student": {"_orig_mod." + k: v for k, v in student.state_dict().items()},
        "projection": None,
        "epoch": 3,
        "global_step": 30,
        "config": cfg.to_dict(),
    }
    path = tmp_path / "checkpoint_epoch_3.pth"
    torch.save(state, path)
    return student, path


def test_trainer_checkpoint_student_becomes_teacher(tmp_path):
    student, path = trainer_checkpoint(tmp_path)
    teacher = quiet_build(tiny_cfg(teacher_name="ignored", teacher_img_size=32, teacher_kwargs={},
                                   teacher_weights=str(path)))
    assert (teacher.grid_size, teacher.patch_size) == ((2, 2), 16)
    x = torch.randn(2, 3, 32, 32)
    cls, patches = teacher(x)
    with torch.no_grad():
        tokens = student.forward_features(x)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patches, tokens[:, 1:])
    # A larger teacher input resamples the student's 2x2 pos_embed rather than failing.
    bigger = quiet_build(
        tiny_cfg(teacher_img_size=64, teacher_kwargs={}, teacher_weights=str(path))
    )
    assert bigger(torch.randn(1, 3, 64, 64))[1].shape == (1, 16, 32)


def test_trainer_checkpoint_says_which_teacher_keys_it_overrides(tmp_path):
    """The architecture and input size of a trainer checkpoint's student win over teacher_name /
    teacher_kwargs / teacher_img_size: one warning line names each that disagrees, none when they
    agree (issue 13, item 16)."""
    _, path = trainer_checkpoint(tmp_path)
    with pytest.warns(UserWarning) as record:
        build_teacher(
            tiny_cfg(
                teacher_name="dinov2_vitb14",
                teacher_img_size=64,
                teacher_kwargs={"depth": 4},
                teacher_weights=str(path),
            ),
            "cpu",
        )
    (message,) = [str(w.message) for w in record]
    assert (
        message
        == f"model.teacher_weights={path} is a trainer checkpoint: the teacher is its student "
        f"vit_small_patch16_224 {TINY}; ignored: model.teacher_name=dinov2_vitb14, "
        "model.teacher_kwargs={'depth': 4}; model.teacher_img_size=64 is not the 32 px it was "
        "trained at: its position embedding is resampled"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching keys (or empty kwargs): nothing to say
        build_teacher(
            tiny_cfg(
                teacher_name="vit_small_patch16_224",
                teacher_img_size=32,
                teacher_kwargs={},
                teacher_weights=str(path),
            ),
            "cpu",
        )


def test_safetensors_timm_state_dict(tmp_path):
    from safetensors.torch import save_file
    # Saved at 28 px (2x2 grid) to exercise the resampling to the teacher's 4x4 grid as well.
    source = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, **TINY
    )
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    teacher = quiet_build(tiny_cfg(teacher_weights=str(path)))
    sd = teacher.backbone.state_dict()
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    # a DINOv2 teacher resamples by the official rule whatever the file format
    torch.testing.assert_close(
        sd["pos_embed"][:, 1:],
        official_grid(state["pos_embed"][:, 1:], 4, reg=False),
        atol=1e-5,
        rtol=1e-5,
    )


# ---------------------------------------------------------------------------------- one-line errors
def corrupt_file(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(official_state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    return str(bad)


def foreign_dict(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"embeddings.weight": torch.zeros(2)}, path)
    return str(path)


def official_file(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official_state_dict(), path)
    return str(path)


ERROR_CASES = {
    "missing_file": (
        lambda t: dict(teacher_weights=str(t / "nope.pth")),
        ["model.teacher_weights", "nope.pth"],
    ),
    "corrupt_file": (
        lambda t: dict(teacher_weights=corrupt_file(t)),
        ["model.teacher_weights", "truncated.pth"],
    ),
    "foreign_dict": (
        lambda t: dict(teacher_weights=foreign_dict(t)),
        ["model.teacher_weights", "foreign.pth"],
    ),
    "wrong_arch": (
        lambda t: dict(teacher_weights=official_file(t), teacher_kwargs=dict(TINY, embed_dim=48)),
        [
            "model.teacher_weights", "dinov2_vits14_pretrain.pth", "model.teacher_name",
            "embed dim 32",
        ],
    ),
    "unknown_name": (
        lambda t: dict(teacher_name="vit_smal_patch14_dinov2"),
        ["model.teacher_name", "did you mean vit_small_patch14_dinov2"],
    ),
    "img_size": (lambda t: dict(teacher_img_size=50), ["model.teacher_img_size", "patch size 14"]),
    "bad_kwargs": (
        lambda t: dict(teacher_kwargs=dict(TINY, embed_dimm=3)),
        ["model.teacher_kwargs"],
    ),
    "hub_other_name": (
        lambda t: dict(teacher_source="hub", teacher_name="vit_small_patch14_dinov2"),
        ["model.teacher_source", "model.teacher_name"],
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_are_one_line(tmp_path, case):
    make_overrides, expected = ERROR_CASES[case]
    with pytest.raises(UserError) as info:
        quiet_build(tiny_cfg(**make_overrides(tmp_path)))
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, (text, message)


OFFLINE_SCRIPT = """
import json, sys, warnings
from config import ModelConfig, UserError
from dinov2_patcher import build_teacher
out = {}
for case, source in (("timm", "timm"), ("hub", "hub")):
    cfg = ModelConfig(teacher_name="dinov2_vits14", teacher_img_size=56, teacher_pretrained=True,
                      teacher_source=source, teacher_kwargs=dict(embed_dim=32, depth=2, num_heads=2))
    try:
        build_teacher(cfg, "cpu")
        out[case] = "NO ERROR"
    except UserError as e:
        out[case] = str(e)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_offline_pretrained_download_is_one_line_error(tmp_path):
    # A fresh process, because huggingface_hub reads HF_HUB_OFFLINE once at import. The dead proxy
    # and empty caches make sure nothing is downloaded even on a machine with network access.
    dead = "http://127.0.0.1:9"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        TORCH_HOME=str(tmp_path / "torch"),
        HTTPS_PROXY=dead,
        HTTP_PROXY=dead,
        https_proxy=dead,
        http_proxy=dead,
        NO_PROXY="",
        no_proxy="",
        PYTHONPATH=REPO,
    )
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    messages = json.loads(result.stdout.strip().splitlines()[-1])
    for message in messages.values():
        assert "\n" not in message
    assert "model.teacher_weights" in messages["timm"]
    assert (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
        in messages["timm"]
    )
    assert (
        "model.teacher_source=hub" in messages["hub"]
        and "dinov2_vits14_pretrain.pth" in messages["hub"]
    )


@pytest.mark.slow
def test_unreachable_hub_fails_fast_in_one_line(tmp_path):
    """No HF_HUB_OFFLINE set and the hub's host refuses connections: one line, without a minute of
    retries."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.upper() not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "ALL_PROXY")
    }
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://127.0.0.1:9", PYTHONPATH=REPO)
    script = (
        "import torch, dinov2_patcher as p; from config import ModelConfig, UserError\ntry:\n   "
        " p.build_teacher(ModelConfig(teacher_name='dinov2_vits14', teacher_img_size=56,\n       "
        " teacher_kwargs={'embed_dim': 32, 'depth': 1, 'num_heads': 2}),"
        " torch.device('cpu'))\nexcept UserError as e:\n    print('ERR', e)\n"
    )
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.time() - started < 60, "the hub client retried instead of failing fast"
    assert (
        result.stdout.startswith("ERR could not get pretrained weights")
        and "model.teacher_weights" in result.stdout
    )
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr, result.stderr


# ------------------------------------------------------------------- safetensors files users have
def hf_state_dict(official, prefix="", v5_names=False):
    """The official tensors under the key names of a Hugging Face facebook/dinov2-* file
    (model.safetensors as transformers' save_pretrained writes it: attention.attention.query,
    output.dense, layer_scale1.lambda1, mlp.weights_in for SwiGLU, layernorm), written by hand;
    v5_names: transformers >= 5's in-memory names (q_proj, o_proj, gate_proj/up_proj/down_proj)."""
    hf = {}
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "register_tokens": "embeddings.register_tokens",
           "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for key, value in official.items():
        if key in top:
            hf[top[key]] = value
            continue
        block, rest = key.split(".", 2)[1:]
        layer, kind = f"encoder.layer.{block}.", rest.rsplit(".", 1)[-1]
        if rest.startswith("attn.qkv."):
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                where = f"attention.{name[0]}_proj." if v5_names else f"attention.attention.{name}."
                hf[layer + where + kind] = part
        elif rest.startswith("attn.proj."):
            where = "attention.o_proj." if v5_names else "attention.output.dense."
            hf[layer + where + kind] = value
        elif rest.startswith(("ls1.", "ls2.")):
            hf[layer + f"layer_scale{rest[2]}.lambda1"] = value
        elif rest.startswith("mlp.w12.") and v5_names:
            gate, up = value.chunk(2)
            hf[layer + "mlp.gate_proj." + kind], hf[layer + "mlp.up_proj." + kind] = gate, up
        elif rest.startswith("mlp.w12."):
            hf[layer + "mlp.weights_in." + kind] = value
        elif rest.startswith("mlp.w3."):
            hf[layer + ("mlp.down_proj." if v5_names else "mlp.weights_out.") + kind] = value
        else:  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
            hf[layer + rest] = value
    return {prefix + k: v.contiguous() for k, v in hf.items()}


def save_safetensors(state, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def same_tokens(a, b, x):
    for got, want in zip(a(x), b(x)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("reg,giant,layout", [
    (False, False, "hub"), (True, False, "hub"), (False, True, "hub"),
    (False, False, "classifier"), (True, True, "v5_names")])
def test_huggingface_safetensors_give_the_tokens_of_the_official_file(tmp_path, reg, giant, layout):
    official = official_state_dict(reg=reg, giant=giant, seed=5)
    torch.save(official, tmp_path / "official.pth")
    # Dinov2ForImageClassification files keep the model under `dinov2.`, beside a classifier
    hf = hf_state_dict(official, "dinov2." if layout == "classifier" else "", layout == "v5_names")
    if layout == "classifier":
        hf.update({"classifier.weight": torch.zeros(10, 64), "classifier.bias": torch.zeros(10)})
    path = save_safetensors(hf, tmp_path / "model.safetensors")
    name = f"dinov2_vit{'g' if giant else 's'}14{'_reg' if reg else ''}"
    official_path = str(tmp_path / "official.pth")
    reference = quiet_build(tiny_cfg(teacher_name=name, teacher_weights=official_path))
    teacher = quiet_build(tiny_cfg(teacher_name=name, teacher_weights=path))
    assert "Hugging Face format" in teacher.description
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    same_tokens(teacher, reference, x)


@pytest.mark.parametrize("reg", [False, True])
def test_timm_safetensors_give_the_tokens_of_the_official_file(tmp_path, reg):
    """timm's hub files (timm/vit_*_patch14[_reg4]_dinov2.lvd142m) hold the official weights
    converted by timm at the native 37x37 grid; registers models without the CLS position
    (no_embed_class)."""
    from dinov2_patcher import convert_official_dinov2, timm_name
    official = official_state_dict(reg=reg, seed=6)
    torch.save(official, tmp_path / "official.pth")
    name = "dinov2_vits14_reg" if reg else "dinov2_vits14"
    native = timm.create_model(timm_name(name), pretrained=False, num_classes=0, **TINY)
    native.load_state_dict(convert_official_dinov2(dict(official), native))
    path = save_safetensors(native.state_dict(), tmp_path / "model.safetensors")
    assert ("reg_token" in native.state_dict()) == reg
    official_path = str(tmp_path / "official.pth")
    reference = quiet_build(tiny_cfg(teacher_name=name, teacher_weights=official_path))
    teacher = quiet_build(tiny_cfg(teacher_name=name, teacher_weights=path))
    assert "timm format" in teacher.description
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    same_tokens(teacher, reference, x)


@pytest.mark.parametrize("change,needle", [
    ("extra", "1 key(s) match no DINOv2 weight (first "
              "'encoder.layer.0.attention.rotary.inv_freq')"),
    ("part", "has no 'value' part to form blocks.1.attn.qkv.bias"),
])
def test_huggingface_file_with_an_unmatched_key_is_one_line(tmp_path, change, needle):
    hf = hf_state_dict(official_state_dict())
    if change == "extra":
        hf["encoder.layer.0.attention.rotary.inv_freq"] = torch.zeros(4)
    else:
        del hf["encoder.layer.1.attention.attention.value.bias"]
    path = save_safetensors(hf, tmp_path / "model.safetensors")
    with pytest.raises(UserError) as e:
        quiet_build(tiny_cfg(teacher_weights=path))
    assert needle in str(e.value) and "\n" not in str(e.value) and path in str(e.value)


@pytest.mark.parametrize("reg", [False, True])
def test_transformers_dinov2_file_gives_transformers_tokens(tmp_path, reg):
    """A file written by transformers itself (tiny random Dinov2Model), against its own forward."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers not installed; the hand-written Hugging Face layout "
                               "tests above cover the mapping")
    kind = "Dinov2WithRegisters" if reg else "Dinov2"
    config = getattr(transformers, f"{kind}Config")(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        image_size=56, patch_size=14, layerscale_value=0.5)
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}Model")(config).eval()
    model.save_pretrained(str(tmp_path / "hf"))
    name = "dinov2_vits14_reg" if reg else "dinov2_vits14"
    teacher = quiet_build(tiny_cfg(teacher_name=name,
                                   teacher_weights=str(tmp_path / "hf" / "model.safetensors")))
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state
    cls, patches = teacher(x)
    torch.testing.assert_close(cls, tokens[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches, tokens[:, 1 + (4 if reg else 0):], atol=1e-5, rtol=1e-5)
