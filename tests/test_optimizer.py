from __future__ import annotations

import math

import pytest
import timm
import torch

from optimizer import build_optimizer, lr_schedule, param_groups


def test_schedule_endpoints():
    s = lr_schedule(total_steps=100, warmup_steps=10, base_lr=1e-3, min_lr=1e-6)
    assert len(s) == 100
    assert s[0] == pytest.approx(1e-4) and s[9] == pytest.approx(1e-3) and s[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(s[10:], s[11:]))  # monotone decay after warmup
    assert s[-1] == pytest.approx(1e-6, abs=1e-6) and min(s) >= 1e-6
    mid = 10 + 45
    assert s[mid] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 0.5)), rel=1e-6)


def test_warmup_longer_than_run_is_cut():
    s = lr_schedule(total_steps=5, warmup_steps=50, base_lr=1.0, min_lr=0.0)
    assert s == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_no_decay_on_bias_norm_pos_embed_cls_token():
    model = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=32, embed_dim=16, depth=1,
                              num_heads=2, patch_size=8)
    decay, no_decay = param_groups([model], 0.04)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight"}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.04
    opt = build_optimizer([model], 1e-3, 0.04, torch.device("cpu"))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
