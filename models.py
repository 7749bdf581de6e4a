"""The student: a timm ViT trained from scratch, its token outputs, the timm kwargs check;
autocast, and the teacher held in bf16."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Optional, Tuple

import timm
import torch
from torch import nn

from config import ModelConfig, UserError, did_you_mean


def initial_student(cfg) -> nn.Module:
    """The student a run of `cfg` starts from, the same on every rank and in every rerun (the
    trainer's init, the evaluator's untrained baseline): torch.manual_seed(train.seed), then
    build_student. Seeds the global RNG: callers that must not disturb theirs fork it first."""
    torch.manual_seed(cfg.train.seed)
    return build_student(cfg.model)


def build_student(model_cfg: ModelConfig) -> nn.Module:
    """timm ViT at `student_img_size` (96 px -> 6x6 patches for ViT-S/16), random init, no
    classifier."""
    try:
        check_timm_kwargs(model_cfg.student_name, model_cfg.student_kwargs, "model.student_kwargs")
        student = timm.create_model(
            model_cfg.student_name,
            pretrained=False,
            num_classes=0,
            img_size=model_cfg.student_img_size,
            drop_path_rate=model_cfg.drop_path_rate,
            **model_cfg.student_kwargs,
        )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"model.student_name '{model_cfg.student_name}' is not a timm model; "
                            f"pick one from timm.list_models('vit_*')") from None
        raise
    except (TypeError, AssertionError) as e:  # timm asserts e.g. embed_dim % num_heads == 0
        raise UserError(f"model.student_kwargs {model_cfg.student_kwargs} rejected by timm: "
                        f"{e or type(e).__name__}") from None
    if not hasattr(student, "patch_embed") or getattr(student, "cls_token", None) is None:
        raise UserError(
            f"model.student_name '{model_cfg.student_name}' is not a ViT with a class token; "
            "pick one from timm.list_models('vit_*')"
        )
    patch = student.patch_embed.patch_size[0]
    # timm would silently crop the border pixels that fit no patch
    if model_cfg.student_img_size % patch:
        raise UserError(
            f"model.student_img_size={model_cfg.student_img_size} is not a multiple of the student"
            f" patch size {patch}; use e.g."
            f" {max(1, round(model_cfg.student_img_size / patch)) * patch} (and the same"
            " data.image_size)"
        )
    return student


def check_timm_kwargs(name: str, kwargs: Dict[str, Any], origin: str) -> None:
    """Every kwargs key must be an argument of the model class timm builds for `name`: timm ignores
    the others without a word (null values are refused when the config loads,
    config._check_value)."""
    model_class = _timm_class(name) if kwargs else None
    # no kwargs; or not a timm name / not buildable with its defaults: the real build says so
    if model_class is None:
        return
    params = inspect.signature(model_class.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return  # takes anything: timm's own errors are all there is
    accepted = [p for p in params if p != "self"]
    for key in kwargs:
        if key not in accepted:
            hint = (did_you_mean(key, accepted, prefix="", suffix="")
                    or f"accepted: {', '.join(accepted[:12])}, ...")
            raise UserError(
                f"{origin}: '{key}' is not an argument of timm's {model_class.__name__} ({name}); "
                f"{hint}"
            )


@functools.lru_cache(maxsize=None)
def _timm_class(name: str) -> Optional[type]:
    """The class timm builds for `name`, read off a model built on the meta device (no memory, ~0.1
    s) once per name: the trainer checks the kwargs before loading data and again where it builds
    the models."""
    try:
        with torch.device("meta"):
            return type(timm.create_model(name, pretrained=False, num_classes=0))
    except Exception:
        return None


def student_tokens(student: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """CLS [B, D] and patch tokens [B, N, D] after the final norm (prefix/register tokens
    dropped)."""
    tokens = student.forward_features(x)
    prefix = getattr(student, "num_prefix_tokens", 1)
    return tokens[:, 0], tokens[:, prefix:]


def pooled_feature(cls: torch.Tensor, patches: torch.Tensor, use_cls_token: bool) -> torch.Tensor:
    """The probe's feature: the CLS token, or the mean of the patch tokens."""
    return cls if use_cls_token else patches.mean(dim=1)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on Ampere+ GPUs by default; fp32 (no autocast) on CPU and older GPUs unless
    bf16 is asked for."""
    native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    if precision == "bf16" and device.type == "cuda" and not native_bf16:
        raise UserError(
            f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no native bf16"
            " (needs compute capability 8.0+, e.g. A100/H100); use precision auto or fp32"
        )
    if precision == "bf16" or (precision == "auto" and native_bf16):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype], cache_enabled: bool = True):
    """torch.autocast in `dtype` on `device`, or a no-op context when dtype is None (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                          cache_enabled=cache_enabled)


class HeldTeacher(nn.Module):
    """The frozen teacher with its weights cast once to `dtype` (bf16), run outside autocast.

    Under bf16 autocast an fp32 teacher has its weights re-cast on every forward (ViT-B: ~0.5 GB of
    memory traffic per step); held in bf16 it reads them as they are. The outputs are float32, as
    the autocast path's final LayerNorm returns them, so every caller (step, target statistics,
    cache, diagnostics) is unchanged.
    """

    def __init__(self, teacher: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = teacher.to(dtype)
        self.dtype = dtype
        self.embed_dim, self.grid_size = teacher.embed_dim, teacher.grid_size
        self.patch_size, self.num_prefix_tokens = teacher.patch_size, teacher.num_prefix_tokens
        held = str(dtype).replace("torch.", "")
        self.description = f"{teacher.description}, weights held in {held}"
        super().train(False)

    @property
    def backbone(self) -> nn.Module:
        return self.inner.backbone

    @property
    def target_dim(self) -> int:  # model.teacher_blocks: the width of what forward returns
        return self.inner.target_dim

    @property
    def target_blocks(self):
        return self.inner.target_blocks

    def train(self, mode: bool = True) -> "HeldTeacher":
        return super().train(False)  # frozen: dropout/drop path never switch on

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            cls, patches = self.inner(x.to(self.dtype))
        return cls.float(), patches.float()


def hold_teacher(teacher: nn.Module, amp: Optional[torch.dtype]) -> nn.Module:
    """The teacher as the run uses it: held in bf16 when the run's autocast is bf16, else as is."""
    return HeldTeacher(teacher, amp) if amp == torch.bfloat16 else teacher
