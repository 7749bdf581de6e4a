"""What the models see: batched augmentation on the training device, one affine resample per batch.

A view is 6 numbers per image, `(x0, y0, w, h, flip, blur_sigma)`, with the crop in fractions of the
source. Sampling the numbers (CPU, seeded) is separate from rendering them (any device), so the
teacher-feature cache can regenerate the exact views of a step from its seed. `model_inputs` is the
one place where images become model inputs, for training, the teacher cache, diagnostics and
evaluation: the teacher sees the student's view, only resized:

    params = sample_view_params(batch, generator, blur_prob=cfg.train.blur_prob)
    student_x, teacher_x = model_inputs(images_uint8.to(device), params, 96, teacher_size=224)
    student_x, _ = model_inputs(images_uint8, identity_params(len(images_uint8)), 96)     #
    evaluation: resize only
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NUM_CROP_TRIES = 10  # as torchvision's RandomResizedCrop
BLUR_SIGMA_RANGE = (0.1, 2.0)  # px at the output resolution (DINO's GaussianBlur range)


def sample_view_params(
    n: int,
    generator: torch.Generator,
    minimal: bool = False,
    blur_prob: float = 0.0,
    scale: Tuple[float, float] = (0.2, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """float32 [n, 6] CPU rows (x0, y0, w, h, flip, blur_sigma); deterministic given the generator
    state.

    RandomResizedCrop semantics, vectorised: area fraction uniform in `scale`, aspect ratio
    log-uniform in `ratio`, the first of 10 tries that fits is kept, else a central crop. Aspect
    ratios are in fractional coordinates, i.e. in pixels for square sources (CIFAR). minimal=True:
    the full image, flip only. The same number of random draws is made whatever the flags, so the
    generator advances identically.
    """
    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=generator.device).cpu().double()

    area = scale[0] + (scale[1] - scale[0]) * rand(n, NUM_CROP_TRIES)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * rand(n, NUM_CROP_TRIES))
    pos, flip_u, blur_u, sigma_u = rand(n, 2), rand(n), rand(n), rand(n)

    w_try, h_try = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w_try <= 1) & (h_try <= 1)
    # index of the first fitting try (0 if none fits)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)
    w, h = w_try.gather(1, first).squeeze(1), h_try.gather(1, first).squeeze(1)
    w_fb, h_fb = _central_crop(ratio)
    any_fit = fits.any(dim=1)
    w, h = torch.where(any_fit, w, torch.full_like(w, w_fb)), torch.where(
        any_fit, h, torch.full_like(h, h_fb)
    )
    x0, y0 = pos[:, 0] * (1 - w), pos[:, 1] * (1 - h)
    x0, y0 = torch.where(any_fit, x0, (1 - w) / 2), torch.where(any_fit, y0, (1 - h) / 2)

    flip = (flip_u < 0.5).double()
    sigma = BLUR_SIGMA_RANGE[0] + (BLUR_SIGMA_RANGE[1] - BLUR_SIGMA_RANGE[0]) * sigma_u
    sigma = torch.where(blur_u < blur_prob, sigma, torch.zeros_like(sigma))
    if minimal:
        zeros, ones = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        x0, y0, w, h, sigma = zeros, zeros, ones, ones, zeros
    return torch.stack([x0, y0, w, h, flip, sigma], dim=1).float()


def _central_crop(ratio: Tuple[float, float]) -> Tuple[float, float]:
    """torchvision's fallback for a square source: the whole image unless its aspect ratio 1 is
    outside `ratio`."""
    if 1 < ratio[0]:
        return 1.0, 1.0 / ratio[0]
    if 1 > ratio[1]:
        return ratio[1], 1.0
    return 1.0, 1.0


def render_views(
    images_uint8: torch.Tensor, params: torch.Tensor, out_size: int, blur: bool = True
) -> torch.Tensor:
    """float32 [B, 3, out, out] in [0, 1] on the images' device: crop, resize, flip (one
    grid_sample), then blur.

    blur=False skips the blur pass whatever the sigmas (the trainer passes `blur_prob > 0`), saving
    two convs.
    """
    device = images_uint8.device
    x = images_uint8.float().div_(255)
    p = params.to(device=device, dtype=torch.float32)
    x0, y0, w, h, flip = p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4]
    # affine_grid maps output coords in [-1, 1] to source coords: x_src = w * x_out + (2 * x0 + w -
    # 1), and a horizontal flip is x_out -> -x_out, i.e. a negative x scale.
    theta = torch.zeros(len(p), 2, 3, device=device)
    theta[:, 0, 0] = w * (1 - 2 * flip)
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta, [len(p), x.shape[1], out_size, out_size], align_corners=False)
    views = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _blur(views, p[:, 5]) if blur else views


# Every view is convolved with its own kernel of one fixed radius (3 sigma_max): choosing which
# views to blur, or a radius from the batch's largest sigma, would read the sigmas back to the host,
# a sync on every step.
BLUR_RADIUS = int(math.ceil(3 * BLUR_SIGMA_RANGE[1]))


def _gaussian_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """[b, 2R+1] normalised 1-D kernels; sigma 0 gives the identity kernel (a unit impulse)."""
    t = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=torch.float32, device=sigma.device)
    k = torch.exp(-0.5 * (t[None, :] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur(views: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    b, c, size = views.shape[0], views.shape[1], views.shape[-1]
    radius = BLUR_RADIUS
    # reflect needs padding smaller than the image
    mode = "reflect" if radius < size else "replicate"
    # [b*c, K]: per sample, per channel
    weight = _gaussian_kernels(sigma.float()).repeat_interleave(c, dim=0)
    x = views.reshape(1, b * c, size, size)
    x = F.conv2d(
        F.pad(x, (radius, radius, 0, 0), mode=mode), weight[:, None, None, :], groups=b * c
    )
    x = F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode=mode), weight[:, None, :, None], groups=b * c
    )
    return x.reshape(b, c, size, size)


def teacher_view(view01: torch.Tensor, size: int) -> torch.Tensor:
    """The student's augmented view resized for the teacher (bicubic, clamped back to [0, 1])."""
    return F.interpolate(view01, size=(size, size), mode="bicubic", align_corners=False).clamp_(
        0, 1
    )


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of [B, 3, H, W] images in [0, 1], on x's device and dtype."""
    mean, std = _mean_std(x01.device, x01.dtype)
    return (x01 - mean) / std


_MEAN_STD = {}


def _mean_std(device: torch.device, dtype: torch.dtype):
    # Built once per device: torch.tensor(..., device='cuda') copies from the host and blocks on
    # every call.
    key = (str(device), dtype)
    if key not in _MEAN_STD:
        _MEAN_STD[key] = (torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1),
                          torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1))
    return _MEAN_STD[key]


def identity_params(n: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """[n, 6] view params of the whole image, unflipped, unblurred: the evaluation and diagnostics
    view."""
    return torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0], device=device).repeat(n, 1)


def model_inputs(
    images_uint8: torch.Tensor,
    params: torch.Tensor,
    student_size: int,
    teacher_size: Optional[int] = None,
    blur: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Normalized (student input [B, 3, s, s], teacher input [B, 3, t, t] or None) for views
    `params` of images.

    The teacher input is the student's view resized to teacher_size (32 -> 96 -> 224 px for CIFAR),
    so both models see the same pixels. blur=False skips the blur pass (the trainer passes
    `blur_prob > 0`).
    """
    view = render_views(images_uint8, params, student_size, blur=blur)
    teacher_x = normalize(teacher_view(view, teacher_size)) if teacher_size is not None else None
    return normalize(view), teacher_x
