"""The frozen teacher: everything that knows about DINOv2 checkpoints, names, downloads and
torch.hub.

    teacher = build_teacher(cfg.model, device)
    cls, patches = teacher(x_normalized)     # [B, D], [B, N, D] after the final norm, registers
    removed print(teacher.description)               # one line for the log: name, source, weights,
    img size, grid

Weights come from exactly one place, chosen by the model config:
  teacher_weights: PATH   a local file, never silently replaced: an official DINOv2 .pth
  (dl.fbaipublicfiles.com),
                          a timm state dict (.pth/.pt/.bin/.safetensors, e.g. the model.safetensors
                          of timm/vit_base_patch14_dinov2), a Hugging Face DINOv2 file (the
                          model.safetensors of facebook/dinov2-base, with or without registers) or
                          a checkpoint written by distill_trainer.py (its student: the teacher);
  teacher_pretrained      true: timm's Hugging Face download (or cache); false: random init, smoke
  tests only; teacher_source: hub     torch.hub facebookresearch/dinov2 (needs the hub cache on
  offline nodes).
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import re
import socket
import sys
import urllib.parse
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from checkpoint import strip_prefixes
from config import UserError
from models import check_timm_kwargs

# DINOv2 hub names -> timm models with the same weights (timm/*.lvd142m on the Hugging Face hub).
DINOV2_TIMM_NAMES = {
    f"dinov2_vit{short}14{reg}": f"vit_{size}_patch14{'_reg4' if reg else ''}_dinov2.lvd142m"
    for short, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for reg in ("", "_reg")
}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
ACCEPTED_FORMATS = ("an official DINOv2 *_pretrain.pth, a timm state dict "
                    "(.pth/.pt/.bin/.safetensors), a Hugging Face facebook/dinov2-* "
                    "model.safetensors or a "
                    "checkpoint_*.pth written by distill_trainer.py")


class Teacher(nn.Module):
    """A frozen ViT returning (cls [B,D], patches [B,N,D]) after the final norm; prefix/register
    tokens dropped.

    Always in eval mode: `.train()` is a no-op, so a trainer calling `model.train()` on everything
    cannot switch on dropout/drop-path in the teacher. With `target_blocks` other than (-1,)
    (model.teacher_blocks) forward returns the tokens of those blocks, each through the final norm
    as the last block's are, concatenated along the width (`target_dim` = embed_dim x blocks) or
    averaged; `embed_dim` stays the backbone's width.
    """

    def __init__(self, backbone: nn.Module, source: str, embed_dim: int, grid_size: Tuple[int, int],
                 patch_size: int, num_prefix_tokens: int, description: str):
        super().__init__()
        self.backbone = backbone
        # "timm" (forward_features -> tokens) or "hub" (forward_features -> dict)
        self.source = source
        self.embed_dim = int(embed_dim)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.patch_size = int(patch_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.description = description
        self.target_blocks: Tuple[int, ...] = (-1,)
        self.combine = "concat"
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @property
    def target_dim(self) -> int:
        concat = self.combine == "concat"
        return self.embed_dim * (len(self.target_blocks) if concat else 1)

    def set_target_blocks(self, blocks: Sequence[int], combine: str) -> None:
        depth = len(self.backbone.blocks)
        if any(not -depth <= b < depth for b in blocks):
            raise UserError(f"model.teacher_blocks={list(blocks)}: the teacher has {depth} blocks; "
                            f"use indices from -{depth} to {depth - 1} (-1 = last), e.g. [-2, -1]")
        # The same block named twice (-1 and depth - 1) would be a silent duplicate target.
        if len({b % depth for b in blocks}) != len(blocks):
            raise UserError(f"model.teacher_blocks={list(blocks)} names a block twice ({depth} "
                            f"blocks); list each block once")
        self.target_blocks, self.combine = tuple(blocks), combine

    def _block_tokens(self, x: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(cls, patches) of each target block, after the final norm."""
        if self.source == "hub":
            depth = len(self.backbone.blocks)
            out = self.backbone.get_intermediate_layers(
                x, n=[b % depth for b in self.target_blocks], return_class_token=True, norm=True)
            return [(cls, patches) for patches, cls in out]
        out = self.backbone.forward_intermediates(
            x, indices=list(self.target_blocks), norm=True, output_fmt="NLC",
            intermediates_only=True, return_prefix_tokens=True)
        return [(prefix[:, 0], patches) for patches, prefix in out]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # no_grad, not inference_mode: inference tensors "cannot be saved for backward", so a loss
        # such as mse_loss(student, teacher_target) would fail in backward; no_grad outputs are
        # ordinary constants.
        with torch.no_grad():
            if self.target_blocks != (-1,):
                blocks = self._block_tokens(x)
                join = ((lambda ts: torch.cat(ts, dim=-1)) if self.combine == "concat"
                        else (lambda ts: torch.stack(ts).mean(0)))
                return join([c for c, _ in blocks]), join([p for _, p in blocks])
            if self.source == "hub":
                out = self.backbone.forward_features(x)
                return out["x_norm_clstoken"], out["x_norm_patchtokens"]
            tokens = self.backbone.forward_features(x)
            return tokens[:, 0], tokens[:, self.num_prefix_tokens:]


def check_weights_file(model_cfg) -> None:
    """The named teacher weights file exists: checked before the data (minutes for a big folder)."""
    if model_cfg.teacher_weights is not None and not os.path.isfile(model_cfg.teacher_weights):
        raise UserError(
            f"model.teacher_weights={model_cfg.teacher_weights}: file not found; point it to an"
            f" existing file ({ACCEPTED_FORMATS}) or set it to null"
        )


def teacher_identity(model_cfg) -> Dict[str, Any]:
    """What names a teacher in every place that keys one (the evaluator's shared teacher features,
    the teacher cache, the report's teacher rows): the model, where its weights come from (a file
    path, the pretrained download, or a random init seeded by the run) and its input size. The
    weights' content is fingerprinted where it matters (checkpoint.teacher_record, the cache key);
    the pos-embed rule follows from the name (DINOv2's official rule for dinov2_* names)."""
    m = model_cfg
    return {"name": m.teacher_name, "source": m.teacher_source, "img_size": m.teacher_img_size,
            "pretrained": m.teacher_pretrained, "weights": m.teacher_weights,
            "kwargs": dict(m.teacher_kwargs)}


def build_teacher(model_cfg, device, targets: bool = False) -> Teacher:
    """Builds the frozen teacher on `device` from a ModelConfig; every user mistake is a one-line
    UserError.

    targets: forward returns the training targets (model.teacher_blocks); else the last block (the
    teacher's own features, what the evaluator probes).
    """
    check_weights_file(model_cfg)
    if model_cfg.teacher_source == "hub":
        backbone, desc = _build_hub(model_cfg)
        grid = model_cfg.teacher_img_size // backbone.patch_size
        teacher = Teacher(backbone, "hub", backbone.embed_dim, (grid, grid), backbone.patch_size,
                          1 + getattr(backbone, "num_register_tokens", 0), desc)
    else:
        backbone, desc = _build_timm(model_cfg)
        teacher = Teacher(
            backbone,
            "timm",
            backbone.embed_dim,
            tuple(backbone.patch_embed.grid_size),
            backbone.patch_embed.patch_size[0],
            backbone.num_prefix_tokens,
            desc,
        )
    teacher.description = (
        f"teacher {desc}, img {model_cfg.teacher_img_size} px, grid "
        f"{teacher.grid_size[0]}x{teacher.grid_size[1]}, patch {teacher.patch_size}, "
        f"dim {teacher.embed_dim}"
    )
    if targets:
        teacher.set_target_blocks(model_cfg.teacher_blocks, model_cfg.teacher_blocks_combine)
    return teacher.to(device)


# --------------------------------------------------------------------------------------------------
# timm models
# --------------------------------------------------------------------------------------------------
def timm_name(teacher_name: str) -> str:
    """dinov2_vitb14[_reg] -> vit_base_patch14[_reg4]_dinov2.lvd142m; any other string is taken as a
    timm name."""
    return DINOV2_TIMM_NAMES.get(teacher_name, teacher_name)


def _build_timm(cfg) -> Tuple[nn.Module, str]:
    name = timm_name(cfg.teacher_name)
    shown = name if name == cfg.teacher_name else f"{cfg.teacher_name} (timm {name})"
    if cfg.teacher_weights is not None:
        return _model_from_file(cfg, name, shown)
    if not cfg.teacher_pretrained:
        model = create_vit(name, cfg.teacher_img_size, cfg.teacher_kwargs, "model.teacher_name")
        warnings.warn(
            "model.teacher_pretrained=false: the teacher is RANDOMLY INITIALISED; distillation"
            " results are meaningless except as smoke tests",
            stacklevel=3,
        )
        return model, f"{shown}, weights: RANDOM INIT"
    model = create_vit(
        name, cfg.teacher_img_size, cfg.teacher_kwargs, "model.teacher_name",
        pretrained=True,
        on_download_error=lambda e: _download_error(cfg.teacher_name, name, e),
    )
    return model, f"{shown}, weights: pretrained (timm / Hugging Face hub)"


def create_vit(
    name: str,
    img_size: int,
    kwargs: Dict[str, Any],
    origin: str,
    pretrained: bool = False,
    on_download_error=None,
    kwargs_origin: str = "model.teacher_kwargs",
) -> nn.Module:
    """timm.create_model(num_classes=0, img_size) after a cheap check of the name, kwargs and patch
    size.

    The check builds the model on the meta device (no memory, ~0.1 s), so a typo or a bad img_size
    fails before any download. `origin` names the config key the architecture came from, for the
    error line.
    """
    if not timm.is_model(name):
        raise UserError(
            f"{origin}={name} is not a timm model{_close_names(name)}; use"
            " dinov2_vit{s,b,l,g}14[_reg] or a name from timm.list_models()"
        )
    check_timm_kwargs(name, kwargs, kwargs_origin)
    args = dict(pretrained=False, num_classes=0, img_size=img_size, **kwargs)
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, **args)
    except Exception as e:
        raise UserError(
            f"{origin}={name} cannot be built with img_size={img_size} and"
            f" {kwargs_origin}={kwargs}: {_first_line(e)}"
        ) from None
    if not hasattr(probe, "patch_embed") or getattr(probe, "cls_token", None) is None:
        raise UserError(
            f"{origin}={name} is not a ViT with a class token; the teacher must return CLS + patch"
            " tokens"
        )
    patch = probe.patch_embed.patch_size[0]
    if img_size % patch != 0:
        raise UserError(
            f"model.teacher_img_size={img_size} is not a multiple of the teacher patch size {patch}"
            f" ({name}); use e.g. {max(1, round(img_size / patch)) * patch}"
        )
    if not pretrained:
        return timm.create_model(name, **args)
    rule = pos_embed_rule(name)
    try:
        with _hub_quiet_and_fast():
            if rule == "timm":
                return timm.create_model(name, **dict(args, pretrained=True))
            # DINOv2: timm would resample the 37x37 grid at load by its own rule (size + antialias);
            # load at the native 518 px grid instead and resample as the official model does
            # (resample_pos_embed).
            native_args = {k: v for k, v in args.items() if k != "img_size"}
            native = timm.create_model(name, **dict(native_args, pretrained=True))
    # HF hub / network / offline errors come in many types; all mean "no weights here"
    except Exception as e:
        raise on_download_error(e) from None
    model = timm.create_model(name, **args)
    model.load_state_dict(resample_pos_embed(native.state_dict(), model, rule))
    return model


def pos_embed_rule(name: str) -> str:
    """How a position embedding is resampled to another grid: 'dinov2' / 'dinov2_reg' (the official
    DINOv2 rules, for any DINOv2 timm name) or 'timm' (bicubic with antialias, for every other
    model)."""
    if "dinov2" not in name:
        return "timm"
    return "dinov2_reg" if "_reg" in name else "dinov2"


@contextlib.contextmanager
def _hub_quiet_and_fast():
    """Hub downloads without retry chatter, and without a minute of retries when the hub cannot be
    reached.

    When the hub's host does not answer (compute nodes), the call runs in the hub's offline mode:
    weights already in the cache still load, missing ones fail at once, and the caller prints one
    line on how to get them.
    """
    import huggingface_hub.constants as hub_constants
    hub_logger = logging.getLogger("huggingface_hub")
    level, offline = hub_logger.level, hub_constants.HF_HUB_OFFLINE
    hub_logger.setLevel(logging.ERROR)
    if not offline and not _hub_reachable():
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_logger.setLevel(level)
        hub_constants.HF_HUB_OFFLINE = offline


def _hub_reachable(timeout: float = 5.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; a direct probe would say nothing
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _close_names(name: str) -> str:
    base = name.split(".")[0]
    candidates = timm.list_models(base.split("_")[0] + "*") or timm.list_models()
    close = difflib.get_close_matches(base, candidates, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__


def _official_file(teacher_name: str) -> Optional[str]:
    """dinov2_vitb14_reg ->
    https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"""
    if teacher_name not in DINOV2_TIMM_NAMES:
        return None
    base = teacher_name[:-len("_reg")] if teacher_name.endswith("_reg") else teacher_name
    full = base + ("_reg4" if teacher_name.endswith("_reg") else "")
    return f"{DINOV2_URL}/{base}/{full}_pretrain.pth"


def _download_error(teacher_name: str, name: str, e: BaseException) -> UserError:
    url = _official_file(teacher_name)
    fill_cache = (
        f"on a login node run python -c \"import timm; timm.create_model('{name}',"
        " pretrained=True)\" to fill the Hugging Face cache (HF_HOME shared with this node)"
    )
    if url is not None:
        fix = (
            f"download {url} on a login node and set"
            f" model.teacher_weights=/path/to/{url.rsplit('/', 1)[1]}, or {fill_cache}"
        )
    else:
        hf_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) if name else None
        fix = (
            f"to fetch the Hugging Face model {hf_id or name}, {fill_cache}; or download its"
            " weights and set model.teacher_weights=/path/to/file"
        )
    return UserError(f"could not get pretrained weights for model.teacher_name={teacher_name} "
                     f"({_first_line(e, 100)}; offline or no network?): {fix}")


# --------------------------------------------------------------------------------------------------
# local weights: official DINOv2, timm, or a distill_trainer.py checkpoint
# --------------------------------------------------------------------------------------------------
def _model_from_file(cfg, name: str, shown: str) -> Tuple[nn.Module, str]:
    path = cfg.teacher_weights
    obj = read_weights_file(path)
    if isinstance(obj, dict) and "student" in obj and "config" in obj:
        return _student_as_teacher(cfg, obj, path)
    state, kind = _state_dict_of(obj, path)
    model = create_vit(name, cfg.teacher_img_size, cfg.teacher_kwargs, "model.teacher_name")
    if kind in ("official", "Hugging Face"):
        state = convert_official_dinov2(state, model)
    state = resample_pos_embed(state, model, pos_embed_rule(name))
    load_strict(model, state, path, f"model.teacher_name={cfg.teacher_name} / model.teacher_kwargs")
    return model, f"{shown}, weights: {path} ({kind} format)"


def read_weights_file(path: str) -> Any:
    """Loads a .safetensors file or torch.load(weights_only=True); unreadable -> one-line
    UserError."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    # truncated zip, bad pickle, foreign globals, bad safetensors header, ...
    except Exception as e:
        raise UserError(
            f"model.teacher_weights={path} cannot be read ({_first_line(e, 100)}): truncated,"
            f" corrupt or not a weights file; accepted: {ACCEPTED_FORMATS}"
        ) from None


def _state_dict_of(obj: Any, path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """Unwraps common containers and returns (flat state dict, kind): kind 'official', 'timm' or
    'Hugging Face' (returned in official names)."""
    # DINOv2 eval/train checkpoints, generic wrappers
    for key in ("teacher", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(
            f"model.teacher_weights={path} is not a recognised weights file (expected a dict of"
            f" tensors or a trainer checkpoint); accepted: {ACCEPTED_FORMATS}"
        )
    state = strip_prefixes(obj)
    # DINOv2 training checkpoints keep the ViT under backbone.
    for owner in ("teacher.backbone.", "backbone."):
        if any(k.startswith(owner) for k in state):
            state = {k[len(owner):]: v for k, v in state.items() if k.startswith(owner)}
            break
    if any(k.endswith(HF_PATCH_KEY) for k in state):
        return convert_hf_dinov2(state, path), "Hugging Face"
    official = any(k in ("mask_token", "register_tokens") or re.match(r"blocks\.\d+\.\d+\.", k)
                   or ".mlp.w12." in k for k in state)
    if not official and "patch_embed.proj.weight" not in state:
        raise UserError(
            f"model.teacher_weights={path}: no 'patch_embed.proj.weight' among {len(state)} tensors"
            f" (first key '{next(iter(state))}'); not a ViT state dict. Accepted:"
            f" {ACCEPTED_FORMATS}"
        )
    return state, ("official" if official else "timm")


# Hugging Face transformers Dinov2Model / Dinov2WithRegistersModel names (the hub's
# model.safetensors, what save_pretrained writes, and transformers >= 5's in-memory names) ->
# official DINOv2 names.
HF_PATCH_KEY = "embeddings.patch_embeddings.projection.weight"
HF_LAYER = r"encoder\.layer\.(\d+)\."
HF_RENAMES = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.register_tokens", "register_tokens"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (HF_LAYER + r"norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (HF_LAYER + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (HF_LAYER + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (HF_LAYER + r"mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (HF_LAYER + r"mlp\.weights_in\.(weight|bias)", r"blocks.\1.mlp.w12.\2"),  # SwiGLU (giant)
    (HF_LAYER + r"mlp\.(?:weights_out|down_proj)\.(weight|bias)", r"blocks.\1.mlp.w3.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
# Tensors HF keeps apart and the official model packs into one: (pattern, official name, parts in
# the packed order, aliases joined by '|').
HF_PACKED = (
    (HF_LAYER + r"attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)",
     "blocks.{}.attn.qkv.{}", ("query|q_proj", "key|k_proj", "value|v_proj")),
    # SwiGLU: silu(first half) * second half, as the official w12
    (HF_LAYER + r"mlp\.(gate_proj|up_proj)\.(weight|bias)", "blocks.{}.mlp.w12.{}",
     ("gate_proj", "up_proj")),
)


def convert_hf_dinov2(state: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """Hugging Face DINOv2 keys -> official DINOv2 keys (query, key, value joined into qkv).

    A *ForImageClassification file's model prefix (`dinov2.`) is dropped, and its classifier. A key
    that maps to nothing, or a packed tensor missing a part, is one UserError line naming it.
    """
    prefix = next(k for k in state if k.endswith(HF_PATCH_KEY))[:-len(HF_PATCH_KEY)]
    out, packed, unmatched = {}, {}, []
    for key, value in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        target = _hf_rename(name) if name is not None else None
        part = _hf_part(name) if name is not None and target is None else None
        if target is not None:
            out[target] = value
        elif part is not None:
            packed.setdefault(part[0], (part[2], {}))[1][part[1]] = (key, value)
        elif not key.startswith("classifier."):  # a classification head: no part of the features
            unmatched.append(key)
    if unmatched:
        raise UserError(f"model.teacher_weights={path} (Hugging Face DINOv2 layout): "
                        f"{len(unmatched)} key(s) match no DINOv2 weight (first '{unmatched[0]}'); "
                        f"pass the file of a Dinov2Model or Dinov2WithRegistersModel (e.g. "
                        f"facebook/dinov2-base's model.safetensors)")
    for target, (order, found) in packed.items():
        missing = [role for role in order if role not in found]
        if missing:
            raise UserError(f"model.teacher_weights={path} (Hugging Face DINOv2 layout): "
                            f"'{next(iter(found.values()))[0]}' has no "
                            f"'{missing[0].split('|')[0]}' part to form "
                            f"{target}; the file is incomplete")
        out[target] = torch.cat([found[role][1] for role in order])
    return out


def _hf_rename(name: str) -> Optional[str]:
    for pattern, target in HF_RENAMES:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(target)
    return None


def _hf_part(name: str) -> Optional[Tuple[str, str, Tuple[str, ...]]]:
    """(official name, role, roles in packed order) of a part HF keeps apart."""
    for pattern, target, order in HF_PACKED:
        match = re.fullmatch(pattern, name)
        if match:
            block, part, kind = match.groups()
            return target.format(block, kind), next(r for r in order if part in r.split("|")), order
    return None


def convert_official_dinov2(
    state: Dict[str, torch.Tensor], model: nn.Module
) -> Dict[str, torch.Tensor]:
    """Official DINOv2 keys -> timm keys.

    FSDP training checkpoints chunk the blocks (`blocks.<chunk>.<block>.`, block index global), so
    the chunk level is dropped. timm's own converter then removes mask_token, folds registers and
    the CLS position into the no_embed_class layout of the *_reg4 models, and renames giant's SwiGLU
    w12/w3 to fc1/fc2 (same silu(first half) * second half packing, timm's SwiGLUPacked).
    """
    from timm.models.vision_transformer import _convert_dinov2
    unchunked = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    return _convert_dinov2(unchunked, model)


def resample_pos_embed(
    state: Dict[str, torch.Tensor], model: nn.Module, rule: str = "timm"
) -> Dict[str, torch.Tensor]:
    """Resamples a square pos_embed grid to the model's grid, e.g. 37x37 (518 px) -> 16x16 (224 px),
    by `rule`:

    'dinov2'      the official DINOv2 `interpolate_pos_encoding` (non-register models): bicubic with
                  scale_factor (16 + 0.1) / 37 per side and no antialias, as the hub model does at
                  every forward;
    'dinov2_reg'  the official rule of the register models: bicubic to size (16, 16), antialias on;
    'timm'        bicubic to size, antialias on (timm's rule; trainer checkpoints and other timm
    models).

    The number of prefix positions (1 for CLS, 0 for no_embed_class models) is read off the model,
    so the same code serves official, timm and trainer checkpoints. A non-square file grid is left
    alone for load_strict to report.
    """
    pos = state.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.dim() != 3:
        return state
    grid = tuple(model.patch_embed.grid_size)
    prefix = own.shape[1] - grid[0] * grid[1]
    side = math.isqrt(max(pos.shape[1] - prefix, 0))
    if prefix < 0 or side * side != pos.shape[1] - prefix or (side, side) == grid:
        return state
    state = dict(state)
    if rule == "timm":
        state["pos_embed"] = resample_abs_pos_embed(
            pos.float(),
            new_size=list(grid),
            old_size=[side, side],
            num_prefix_tokens=prefix,
            interpolation="bicubic",
            antialias=True,
        ).to(pos.dtype)
        return state
    if rule not in ("dinov2", "dinov2_reg"):
        raise ValueError(f"unknown pos_embed rule {rule!r}")
    patches = pos[:, prefix:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if rule == "dinov2":
        # The +0.1 is the official code's guard against a float floor below the grid size; it also
        # shifts where the bicubic kernel samples, which is why the exact rule matters for the
        # tokens.
        scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    else:
        patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True)
    if tuple(patches.shape[-2:]) != grid:
        raise ValueError(f"pos_embed resampled to {tuple(patches.shape[-2:])}, expected {grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    state["pos_embed"] = torch.cat([pos[:, :prefix].float(), patches], dim=1).to(pos.dtype)
    return state


def load_strict(
    model: nn.Module, state: Dict[str, torch.Tensor], path: str, arch_keys: str
) -> None:
    """load_state_dict(strict=True), but a mismatch is one line: first missing/unexpected key and a
    shape hint."""
    own = model.state_dict()
    # a classifier head is not part of the features we use
    if not any(k.startswith("head.") for k in own):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first '{unexpected[0]}')")
        if shapes:
            k = shapes[0]
            parts.append(
                f"shape of '{k}' is {list(state[k].shape)} in the file, {list(own[k].shape)} in the"
                " model"
            )
        file_dim = state.get("patch_embed.proj.weight")
        dims = (
            f"; file embed dim {file_dim.shape[0]} vs model"
            f" {own['patch_embed.proj.weight'].shape[0]}"
            if file_dim is not None and "patch_embed.proj.weight" in own
            else ""
        )
        raise UserError(
            f"model.teacher_weights={path} does not fit the architecture from {arch_keys}: "
            f"{', '.join(parts)}{dims}; pick the matching teacher_name (e.g. dinov2_vitb14 for "
            "dinov2_vitb14_pretrain.pth)"
        )
    model.load_state_dict(state, strict=True)


def _student_as_teacher(cfg, ckpt: Dict[str, Any], path: str) -> Tuple[nn.Module, str]:
    """A distill_trainer.py checkpoint: rebuild its student at teacher_img_size and load it
    (pos_embed resampled)."""
    model_section = ckpt["config"].get("model") if isinstance(ckpt["config"], dict) else None
    if not isinstance(model_section, dict) or "student_name" not in model_section \
            or not isinstance(ckpt["student"], dict):
        raise UserError(
            f"model.teacher_weights={path} has 'student'/'config' entries but no config['model']"
            f"['student_name']; accepted: {ACCEPTED_FORMATS}"
        )
    name = model_section["student_name"]
    # Null values (accepted by older versions) were dropped by timm when the student was built: drop
    # them too.
    kwargs = {k: v for k, v in (model_section.get("student_kwargs") or {}).items() if v is not None}
    # The architecture and input size come from the checkpoint: say so when the teacher keys say
    # otherwise.
    ignored = [
        f"model.{key}={value}"
        for key, value, own in (
            ("teacher_name", cfg.teacher_name, name),
            ("teacher_kwargs", cfg.teacher_kwargs, kwargs),
        )
        if value != own and (key == "teacher_name" or value)
    ]
    trained_size = model_section.get("student_img_size")
    notes = [f"ignored: {', '.join(ignored)}"] if ignored else []
    if trained_size is not None and trained_size != cfg.teacher_img_size:
        notes.append(
            f"model.teacher_img_size={cfg.teacher_img_size} is not the {trained_size} px it was"
            " trained at: its position embedding is resampled"
        )
    if notes:
        warnings.warn(
            f"model.teacher_weights={path} is a trainer checkpoint: the teacher is its student"
            f" {name} {kwargs}; {'; '.join(notes)}",
            stacklevel=4,
        )
    # drop_path_rate is left out: drop path is inactive in eval mode, which the teacher never
    # leaves.
    model = create_vit(name, cfg.teacher_img_size, kwargs, f"student_name in {path}",
                       kwargs_origin=f"student_kwargs in {path}")
    state = resample_pos_embed(strip_prefixes(ckpt["student"]), model)
    load_strict(model, state, path, f"config['model'] stored in the checkpoint ({name}, {kwargs})")
    return (
        model,
        f"student of {path} ({name}), weights: trainer checkpoint epoch {ckpt.get('epoch', '?')}",
    )


# --------------------------------------------------------------------------------------------------
# torch.hub facebookresearch/dinov2 (kept for clusters that already hold the hub cache)
# --------------------------------------------------------------------------------------------------
def _build_hub(cfg) -> Tuple[nn.Module, str]:
    name = cfg.teacher_name
    if name not in DINOV2_TIMM_NAMES:
        raise UserError(
            f"model.teacher_source=hub needs model.teacher_name in {', '.join(DINOV2_TIMM_NAMES)},"
            f" got {name!r}; use teacher_source: timm for other models"
        )
    if cfg.teacher_img_size % 14 != 0:
        raise UserError(
            f"model.teacher_img_size={cfg.teacher_img_size} is not a multiple of the teacher patch"
            f" size 14 ({name}); use e.g. {max(1, round(cfg.teacher_img_size / 14)) * 14}"
        )
    pretrained = cfg.teacher_weights is None
    try:
        with warnings.catch_warnings():
            # dinov2 warns when xformers is absent
            warnings.filterwarnings("ignore", message=".*xFormers")
            # trust_repo=True: an interactive "trust this repo?" prompt would hang a batch job.
            model = torch.hub.load(
                "facebookresearch/dinov2",
                name,
                pretrained=pretrained,
                trust_repo=True,
                skip_validation=True,
                verbose=False,
            )
    except TypeError as e:
        if sys.version_info < (3, 10):
            raise UserError(
                "model.teacher_source=hub: the dinov2 hub code uses 'X | Y' type hints that need"
                f" Python >= 3.10 (this is {sys.version.split()[0]}); use teacher_source: timm"
                " (same weights) or Python >= 3.10"
            ) from None
        raise UserError(
            f"model.teacher_source=hub: loading {name} failed ({_first_line(e)})"
        ) from None
    # no network and no hub cache, or weights not in the hub checkpoint cache
    except Exception as e:
        url = _official_file(name)
        raise UserError(
            f"model.teacher_source=hub: could not load {name} ({_first_line(e, 100)}; offline?):"
            f" use teacher_source: timm with model.teacher_weights=/path/to/{url.rsplit('/', 1)[1]}"
            f" downloaded from {url} on a login node, or fill the torch hub cache ($TORCH_HOME/hub)"
            " there"
        ) from None
    if cfg.teacher_weights is not None:
        state, kind = _state_dict_of(read_weights_file(cfg.teacher_weights), cfg.teacher_weights)
        if kind == "timm":
            raise UserError(f"model.teacher_weights={cfg.teacher_weights}: teacher_source=hub "
                            f"takes an official DINOv2 .pth or a Hugging Face DINOv2 file; use "
                            f"teacher_source: timm for timm or trainer files")
        state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
        load_strict(model, state, cfg.teacher_weights, f"model.teacher_name={name} (torch.hub)")
        return model, f"{name} (torch.hub), weights: {cfg.teacher_weights}"
    return model, f"{name} (torch.hub), weights: official pretrained"
