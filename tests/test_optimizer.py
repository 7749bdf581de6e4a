from __future__ import annotations

import math

import pytest
import timm
import torch

from optimizer import (
    build_optimizer, load_optimizer_state, lr_schedule, optimizer_state, param_groups, set_lr,
)

def test_schedule_endpoints():
    s = lr_schedule(total_steps=100, warmup_steps=10, base_lr=1e-3, min_lr=1e-6)
    assert len(s) == 100
    assert (
        s[0] == pytest.approx(1e-4) and s[9] == pytest.approx(1e-3) and s[10] == pytest.approx(1e-3)
    )
    assert all(a >= b for a, b in zip(s[10:], s[11:]))  # monotone decay after warmup
    assert s[-1] == pytest.approx(1e-6, abs=1e-6) and min(s) >= 1e-6
    mid = 10 + 45
    assert s[mid] == pytest.approx(
        1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 0.5)), rel=1e-6
    )


def test_warmup_longer_than_run_is_cut():
    s = lr_schedule(total_steps=5, warmup_steps=50, base_lr=1.0, min_lr=0.0)
    assert s == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_no_decay_on_bias_norm_pos_embed_cls_token():
    model = tiny_model()
    decay, no_decay = param_groups([model], 0.04)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert {names[id(p)] for p in decay["params"]} >= {
        "blocks.0.attn.qkv.weight",
        "patch_embed.proj.weight",
    }
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.04
    opt = build_optimizer([model], 1e-3, 0.04, torch.device("cpu"))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_small_patch16_224",
        num_classes=0,
        img_size=32,
        embed_dim=16,
        depth=1,
        num_heads=2,
        patch_size=8,
    )


def test_lr_as_tensor_follows_the_schedule_and_trains_as_the_float_lr():
    """The captured step's optimizer: its lr tensor holds every scheduled value in turn (filled in
    place, one tensor object throughout) and the weights follow the plain float-lr optimizer's."""
    schedule = lr_schedule(total_steps=12, warmup_steps=4, base_lr=1e-2, min_lr=1e-4)
    a, b = tiny_model(), tiny_model()
    opt_a = build_optimizer([a], 1e-2, 0.04, torch.device("cpu"))
    opt_b = build_optimizer([b], 1e-2, 0.04, torch.device("cpu"), lr_as_tensor=True)
    lr_tensor = opt_b.param_groups[0]["lr"]
    assert isinstance(lr_tensor, torch.Tensor) and isinstance(opt_a.param_groups[0]["lr"], float)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for lr in schedule:
        for model, opt in ((a, opt_a), (b, opt_b)):
            set_lr(opt, lr)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        assert all(g["lr"] is lr_tensor for g in opt_b.param_groups)
        assert float(lr_tensor) == pytest.approx(lr, rel=1e-6)  # float32 of the schedule's value
    # The tensor holds the lr in float32: weights drift ~4e-5 apart over 12 steps; a 1 % lr error
    # moves them 1e-2.
    drift = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    assert drift < 1e-3, drift


def test_optimizer_state_round_trip_keeps_run_mode_and_lr_tensor():
    model = tiny_model()
    opt = build_optimizer([model], 1e-2, 0.04, torch.device("cpu"), lr_as_tensor=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    set_lr(opt, 3e-3)
    opt.step()
    saved = optimizer_state(opt)
    assert all(
        type(g["lr"]) is float and g["lr"] == pytest.approx(3e-3) for g in saved["param_groups"]
    )
    # Into a plain optimizer (a CPU run resuming a checkpoint of a captured run) and into a
    # tensor-lr one.
    plain = build_optimizer([tiny_model()], 1e-2, 0.04, torch.device("cpu"))
    load_optimizer_state(plain, saved)
    assert (
        plain.param_groups[0]["lr"] == pytest.approx(3e-3)
        and plain.param_groups[0]["capturable"] is False
    )
    tensor_opt = build_optimizer([tiny_model()], 1e-2, 0.04, torch.device("cpu"), lr_as_tensor=True)
    lr_tensor = tensor_opt.param_groups[0]["lr"]
    load_optimizer_state(tensor_opt, saved)
    assert tensor_opt.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(3e-3)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(tensor_opt.state_dict()["state"][0][key], saved["state"][0][key])
