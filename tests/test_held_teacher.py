"""The teacher held in bf16 (models.HeldTeacher): with bf16 autocast its weights are cast once at
load, not at every forward, and its targets match the fp32 teacher's under autocast (the previous
path)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import distill_trainer
from dinov2_patcher import Teacher, build_teacher
from distributed import DistInfo
from helpers import tiny_config
from models import HeldTeacher, autocast
from train_step import make_train_step
from transforms import model_inputs, sample_view_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
# The default teacher's architecture (ViT-B/14, 12 blocks) at 56 px; LayerScale at 1 so that,
# random as they are, the blocks shape the output (DINOv2's 1e-5 init would leave little but the
# patch embedding).
BF16_TEACHER = {"model.teacher_name": "dinov2_vitb14", "model.teacher_img_size": 56,
                "model.teacher_kwargs": {"init_values": 1.0}, "train.precision": "bf16"}


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, synthetic_root):
    cfg = tiny_config(synthetic_root, str(tmp_path_factory.mktemp("run")), **BF16_TEACHER)
    return distill_trainer.build_run(cfg, DistInfo(), CPU)


def teacher_views(run, n=8):
    params = sample_view_params(n, torch.Generator().manual_seed(1))
    return model_inputs(run.data.train_images[:n], params, run.cfg.model.student_img_size,
                        run.cfg.model.teacher_img_size)[1]


def test_bf16_run_holds_the_teacher_in_bf16(bf16_run):
    teacher = bf16_run.teacher
    assert isinstance(teacher, HeldTeacher) and bf16_run.amp == torch.bfloat16
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert teacher.embed_dim == 768 and teacher.grid_size == (4, 4) and not teacher.training
    assert "held in bfloat16" in teacher.description


def test_held_teacher_targets_match_the_autocast_path(bf16_run):
    torch.manual_seed(bf16_run.cfg.train.seed)  # build_run's seed before the teacher: same weights
    reference = build_teacher(bf16_run.cfg.model, CPU)
    assert isinstance(reference, Teacher) and next(reference.parameters()).dtype == torch.float32
    x = teacher_views(bf16_run)
    with autocast(CPU, torch.bfloat16):
        expected = reference(x)
        held_in_autocast = bf16_run.teacher(x)
    held = bf16_run.teacher(x)
    for got, want in zip(held, expected):
        assert got.dtype == want.dtype == torch.float32
        cosine = F.cosine_similarity(got.reshape(-1, 768), want.reshape(-1, 768), dim=-1)
        assert cosine.min() >= 0.999, cosine.min()
        assert not torch.equal(got, want)  # bf16 weights and norms: close, not the same computation
    # The caller's autocast does not reach inside: the same bf16 computation with or without it.
    assert all(torch.equal(a, b) for a, b in zip(held, held_in_autocast))


def test_bf16_step_trains_with_the_held_teacher(bf16_run):
    step = make_train_step(bf16_run)
    indices, params, _ = distill_trainer.epoch_batches(bf16_run, 0)
    losses = torch.stack([step(indices[i], params[i], i) for i in range(2)])
    assert torch.isfinite(losses).all() and losses.dtype == torch.float32


def test_fp32_run_keeps_the_plain_teacher(tmp_path, synthetic_root):
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"))
    run = distill_trainer.build_run(cfg, DistInfo(), CPU)
    assert isinstance(run.teacher, Teacher) and run.amp is None
