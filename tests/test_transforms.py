"""Batched augmentation: crops land where the params say, flips and blur do what they claim, seeds
reproduce."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transforms as T


def _params(rows):
    return torch.tensor(rows, dtype=torch.float32)


def _random_images(b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def test_identity_params_reproduce_image():
    images = _random_images()
    views = T.render_views(images, _params([[0, 0, 1, 1, 0, 0]] * 4), out_size=32)
    assert views.dtype == torch.float32 and views.shape == (4, 3, 32, 32)
    torch.testing.assert_close(views, images.float() / 255, atol=1e-5, rtol=0)


def test_flip_params_match_torch_flip():
    images = _random_images()
    views = T.render_views(images, _params([[0, 0, 1, 1, 1, 0]] * 4), out_size=32)
    torch.testing.assert_close(
        views, torch.flip(images.float() / 255, dims=[-1]), atol=1e-5, rtol=0
    )


def _half_black_half_white(size=32):
    img = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    img[..., size // 2:] = 255
    return img


@pytest.mark.parametrize("crop_w,out_size", [(0.5, 16), (0.4, 96)])
def test_left_crop_of_black_left_half_is_black(crop_w, out_size):
    views = T.render_views(
        _half_black_half_white(), _params([[0, 0, crop_w, 1, 0, 0]]), out_size=out_size
    )
    assert views.abs().max().item() < 1e-6
    # Sanity: the same crop flipped is still the left half, the right half is white.
    flipped = T.render_views(
        _half_black_half_white(), _params([[0, 0, crop_w, 1, 1, 0]]), out_size=out_size
    )
    assert flipped.abs().max().item() < 1e-6
    right = T.render_views(
        _half_black_half_white(), _params([[1 - crop_w, 0, crop_w, 1, 0, 0]]), out_size=out_size
    )
    assert right.min().item() > 1 - 1e-6


@pytest.mark.parametrize("scale,ratio", [((0.2, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.6), (0.5, 2.0))])
def test_crop_params_respect_scale_ratio_and_bounds(scale, ratio):
    p = T.sample_view_params(4000, torch.Generator().manual_seed(0), scale=scale, ratio=ratio)
    assert p.shape == (4000, 6) and p.dtype == torch.float32 and p.device.type == "cpu"
    x0, y0, w, h = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    eps = 1e-5
    assert (
        (x0 >= -eps).all()
        and (y0 >= -eps).all()
        and (x0 + w <= 1 + eps).all()
        and (y0 + h <= 1 + eps).all()
    )
    area, aspect = w * h, w / h
    fallback = (area > 1 - eps)  # central crop when 10 tries fail: the full image for these ratios
    assert ((area >= scale[0] - eps) & (area <= scale[1] + eps) | fallback).all()
    assert ((aspect >= ratio[0] - eps) & (aspect <= ratio[1] + eps)).all()
    # The area is uniform over the range (few fallbacks here), not stuck at one end.
    assert abs(area[~fallback].mean().item() - sum(scale) / 2) < 0.05 * (scale[1] - scale[0]) + 0.02
    assert 0.45 < p[:, 4].mean().item() < 0.55 and set(p[:, 4].unique().tolist()) <= {0.0, 1.0}
    assert (p[:, 5] == 0).all()


def test_same_seed_same_params_and_different_seed_differs():
    a = T.sample_view_params(64, torch.Generator().manual_seed(7), blur_prob=0.5)
    b = T.sample_view_params(64, torch.Generator().manual_seed(7), blur_prob=0.5)
    c = T.sample_view_params(64, torch.Generator().manual_seed(8), blur_prob=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Flags do not change how far the generator advances, so a regenerated stream stays aligned.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    T.sample_view_params(16, g1, minimal=True)
    T.sample_view_params(16, g2, blur_prob=1.0)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_minimal_and_blur_prob():
    p = T.sample_view_params(500, torch.Generator().manual_seed(0), minimal=True, blur_prob=1.0)
    assert torch.equal(p[:, :4], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(500, 4))
    assert (p[:, 5] == 0).all() and 0.4 < p[:, 4].mean().item() < 0.6
    sigma = T.sample_view_params(500, torch.Generator().manual_seed(0), blur_prob=1.0)[:, 5]
    assert (sigma >= 0.1).all() and (sigma <= 2.0).all()
    sigma = T.sample_view_params(2000, torch.Generator().manual_seed(0), blur_prob=0.3)[:, 5]
    assert 0.25 < (sigma > 0).float().mean().item() < 0.35


def _high_freq_energy(x):
    dx, dy = x[..., 1:] - x[..., :-1], x[..., 1:, :] - x[..., :-1, :]
    return (dx ** 2).mean(dim=(1, 2, 3)) + (dy ** 2).mean(dim=(1, 2, 3))


def test_blur_reduces_high_frequency_energy_only_where_asked():
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255).to(torch.uint8)
    images = checker.expand(3, 3, 32, 32).contiguous()
    params = _params([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0.5], [0, 0, 1, 1, 0, 2.0]])
    views = T.render_views(images, params, out_size=32)
    energy = _high_freq_energy(views)
    assert energy[1] < 0.5 * energy[0] and energy[2] < 0.01 * energy[0]
    # sigma 0 left untouched
    torch.testing.assert_close(views[0], images[0].float() / 255, atol=1e-5, rtol=0)
    # A blur keeps the mean brightness (normalised kernel, reflect padding).
    assert abs(views[2].mean().item() - views[0].mean().item()) < 0.01
    assert views.min() >= 0 and views.max() <= 1


def test_teacher_view_of_constant_is_constant():
    view = torch.full((2, 3, 96, 96), 0.3)
    out = T.teacher_view(view, 224)
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, torch.full_like(out, 0.3))
    # Bicubic overshoot near edges is clamped back to [0, 1].
    sharp = T.render_views(_half_black_half_white(), _params([[0, 0, 1, 1, 0, 0]]), 96)
    up = T.teacher_view(sharp, 224)
    assert up.min() >= 0 and up.max() <= 1


def test_identity_view_shape_and_normalization():
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    out, teacher_x = T.model_inputs(images, T.identity_params(2), 96)
    assert out.shape == (2, 3, 96, 96) and out.dtype == torch.float32 and teacher_x is None
    mean, std = torch.tensor(T.IMAGENET_MEAN), torch.tensor(T.IMAGENET_STD)
    expected = ((128 / 255 - mean) / std).view(1, 3, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected)


def test_identity_view_is_a_plain_bilinear_resize():
    # The evaluation view is the minimal training view: a bilinear resize, as F.interpolate does it.
    images = _random_images(2)
    student_x, teacher_x = T.model_inputs(images, T.identity_params(2), 96, teacher_size=224)
    resized = F.interpolate(
        images.float() / 255, size=(96, 96), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(student_x, T.normalize(resized), atol=1e-4, rtol=0)
    # The teacher sees the student's view resized, not the source image resized.
    torch.testing.assert_close(
        teacher_x, T.normalize(T.teacher_view(resized, 224)), atol=1e-4, rtol=0
    )


def test_normalize_keeps_dtype():
    x = torch.rand(2, 3, 4, 4).to(torch.bfloat16)
    assert T.normalize(x).dtype == torch.bfloat16
    torch.testing.assert_close(
        T.normalize(x.float()),
        (x.float() - torch.tensor(T.IMAGENET_MEAN).view(1, 3, 1, 1))
        / torch.tensor(T.IMAGENET_STD).view(1, 3, 1, 1),
    )


def test_render_views_crop_matches_pixel_crop_and_resize():
    # A pixel-aligned crop renders like cropping then resizing with F.interpolate (same sampling
    # convention).
    images = _random_images(1)
    view = T.render_views(images, _params([[0.25, 0.5, 0.5, 0.25, 0, 0]]), 48)
    crop = images[:, :, 16:24, 8:24].float() / 255
    expected = F.interpolate(crop, size=(48, 48), mode="bilinear", align_corners=False)
    # away from the crop border (no bleed there)
    interior = (slice(None), slice(None), slice(6, -6), slice(3, -3))
    torch.testing.assert_close(view[interior], expected[interior], atol=1e-5, rtol=0)
