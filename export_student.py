"""Export a trained student for use elsewhere: weights only, in safetensors, and a JSON naming the
timm model and its kwargs (timm's own config.json fields).

    python export_student.py --checkpoint RUN/checkpoint_epoch_50.pth --out student.safetensors
    python export_student.py --checkpoint RUN/checkpoint_epoch_50.pth --out exported/  # a folder
    python export_student.py --checkpoint OLD.pth --model_config model_config_kd.yaml \
        --out old.safetensors                     # a legacy checkpoint (no stored config)

`--out X.safetensors` writes X.safetensors and X.json; `--out DIR/` writes DIR/model.safetensors and
DIR/config.json, the layout `timm.create_model("local-dir:DIR", pretrained=True)` reads. The EMA
weights are exported when the checkpoint has them ('student_ema'), else the trained weights
(`--weights student|ema` to choose). Load with timm alone, no code of this repo:

    import json, timm
    meta = json.load(open("student.json"))
    model = timm.create_model(meta["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file="student.safetensors"),
                              **meta["model_args"])
    tokens = model.forward_features(x)  # [B, 1 + N, D] after the final norm; x normalized as
                                        # meta["pretrained_cfg"] says (ImageNet mean/std)

Exit codes: 0 written, 2 a user mistake (one line on stderr); nothing is written on error.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from checkpoint import atomic_write, load_checkpoint
from config import (DEFAULT_FILES, ArgumentParser, Config, DataConfig, TrainConfig, UserError,
                    build_section, config_from_dict, one_line_warnings, read_yaml)
from transforms import IMAGENET_MEAN, IMAGENET_STD

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHT_KEYS = {"student": "student", "ema": "student_ema"}  # --weights -> checkpoint entry


def parse_args(argv: Optional[List[str]] = None):
    p = ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint_*.pth written by distill_trainer.py")
    p.add_argument("--out", required=True,
                   help="FILE.safetensors (+ FILE.json beside it) or DIR/ (model.safetensors + "
                        "config.json)")
    p.add_argument("--weights", choices=("auto", *WEIGHT_KEYS), default="auto",
                   help="auto: the EMA weights when the checkpoint has them, else the trained ones")
    p.add_argument("--model_config", default=None,
                   help="architecture of legacy checkpoints, which store no config; default: the "
                        "repo's file")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    return p.parse_args(argv)


def output_paths(out: str) -> Tuple[str, str]:
    """(weights file, JSON file) for --out FILE.safetensors or --out DIR/."""
    if out.endswith(os.sep) or os.path.isdir(out):
        return os.path.join(out, "model.safetensors"), os.path.join(out, "config.json")
    if not out.endswith(".safetensors"):
        raise UserError(f"--out {out}: name a .safetensors file (e.g. student.safetensors) or a "
                        f"folder ending in '/'")
    return out, out[:-len(".safetensors")] + ".json"


def student_config(ckpt: Dict[str, Any], path: str,
                   model_config: Optional[str]) -> Tuple[Config, str]:
    """The config the student was built with, and where its architecture came from (for errors)."""
    if ckpt.get("config") is not None:
        return config_from_dict(ckpt["config"], path), f"the config stored in {path}"
    model_path = model_config or os.path.join(HERE, DEFAULT_FILES["model"])
    model = build_section("model", read_yaml(model_path), model_path)
    return Config(DataConfig(), TrainConfig(), model), model_path


def chosen_weights(ckpt: Dict[str, Any], path: str, weights: str) -> str:
    """The checkpoint entry to export: 'student_ema' or 'student'."""
    has_ema = isinstance(ckpt.get("student_ema"), dict)
    if weights == "ema" and not has_ema:
        raise UserError(f"--weights ema: {path} has no 'student_ema' entry (the run kept no EMA "
                        f"weights); use --weights student")
    key = "student_ema" if weights == "ema" or (weights == "auto" and has_ema) else "student"
    if not isinstance(ckpt.get(key), dict):
        raise UserError(f"checkpoint {path} has no '{key}' state dict; not a distill_trainer.py "
                        f"checkpoint")
    return key


def export(checkpoint: str, out: str, weights: str = "auto", model_config: Optional[str] = None,
           force: bool = False) -> Tuple[str, str]:
    """Writes the student's weights and JSON; returns their paths. Mistakes: one-line UserErrors."""
    from evaluate_checkpoints import load_student  # the evaluator's one-line check that weights fit
    from safetensors.torch import save
    weights_path, json_path = output_paths(out)
    existing = [p for p in (weights_path, json_path) if os.path.exists(p)]
    if existing and not force:
        raise UserError(f"--out {out}: {existing[0]} exists; pass --force to replace it, or "
                        f"another --out")
    ckpt = load_checkpoint(checkpoint)
    key = chosen_weights(ckpt, checkpoint, weights)
    cfg, arch_source = student_config(ckpt, checkpoint, model_config)
    student = load_student(ckpt[key], cfg, checkpoint, arch_source)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"checkpoint {checkpoint} has non-finite (NaN/inf) weights in '{key}' "
                        f"(e.g. '{bad[0]}'); export another epoch")
    meta = timm_config(cfg, student, key, checkpoint, ckpt)
    blob = save(state, metadata={"format": "pt"})
    atomic_write(weights_path, lambda f: f.write(blob))
    atomic_write(json_path, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return weights_path, json_path


def timm_config(cfg: Config, student: torch.nn.Module, key: str, checkpoint: str,
                ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """timm's config.json fields (architecture, model_args, pretrained_cfg) and the provenance."""
    m, size = cfg.model, cfg.model.student_img_size
    # drop_path_rate is left out: it acts in training only
    model_args = {"img_size": size, "num_classes": 0, **m.student_kwargs}
    return {
        "architecture": m.student_name,
        "num_classes": 0,
        "num_features": int(student.num_features),
        "model_args": model_args,
        "pretrained_cfg": {"input_size": [3, size, size], "mean": list(IMAGENET_MEAN),
                           "std": list(IMAGENET_STD), "crop_pct": 1.0, "interpolation": "bicubic",
                           "num_classes": 0},
        "feature": "CLS token (forward_features(x)[:, 0])" if m.use_cls_token
                   else "mean of the patch tokens (forward_features(x)[:, num_prefix_tokens:])",
        "exported_from": {"checkpoint": os.path.abspath(checkpoint), "weights": key,
                          "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")},
    }


@one_line_warnings()
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        weights_path, json_path = export(args.checkpoint, args.out, args.weights, args.model_config,
                                         args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(json_path) as f:
        meta = json.load(f)
    print(f"wrote {weights_path} ({meta['exported_from']['weights']} of {args.checkpoint}, "
          f"{meta['architecture']} {meta['model_args']}) and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
