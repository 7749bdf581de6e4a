"""What only a GPU can show, run by scripts/gpu_checks.sh (skipped without CUDA): a real failed
capture puts back the stream and the RNG and names its own error; a real captured step computes what
the eager one does (drop path on: the graph's RNG must follow the eager one's); the bf16-held
teacher matches autocast there."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import distill_trainer
from dinov2_patcher import build_teacher
from distributed import DistInfo
from helpers import tiny_config
from models import HeldTeacher, autocast
from train_step import (CapturedStep, CaptureFailed, EagerStep, StepMode, capture,
                        check_equivalence, make_train_step)
from transforms import model_inputs, sample_view_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_failed_capture_restores_stream_and_rng_and_names_its_own_error():
    x = torch.ones(4, device=CUDA)
    stream, rng = torch.cuda.current_stream(CUDA), torch.cuda.get_rng_state(CUDA)

    def step_with_host_read():
        torch.rand(4, device=CUDA)
        return float(x.sum())  # a host read: not allowed while the stream is capturing
    with pytest.raises(CaptureFailed) as e:
        capture(step_with_host_read, CUDA, warmup=0)
    assert "previous error during capture" not in e.value.message, e.value.message
    assert torch.cuda.current_stream(CUDA) == stream
    assert torch.equal(torch.cuda.get_rng_state(CUDA), rng)
    torch.empty(8, device=CUDA).bernoulli_(0.5)  # drop path's op: the generator is usable
    torch.cuda.synchronize()


@pytest.mark.parametrize("cached", [False, True], ids=["live_teacher", "cached_targets"])
def test_captured_step_computes_what_the_eager_step_does(tmp_path, synthetic_root, cached):
    extra = {"train.cache_teacher_features": True, "train.teacher_cache_views": 2} if cached else {}
    extra.update({"train.device": "cuda", "model.drop_path_rate": 0.2})
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"), **extra)
    run = distill_trainer.build_run(cfg, DistInfo(), CUDA)
    step = make_train_step(run)
    assert isinstance(step, CapturedStep), step.mode
    eager = EagerStep(run, step.model, step.teacher, StepMode("eager", "test"))
    report = check_equivalence(run, step, eager, distill_trainer.epoch_batches(run, 0))
    print(report)
    assert report["captured_ok"], report


def test_held_teacher_matches_autocast_on_the_gpu(tmp_path, synthetic_root):
    cfg = tiny_config(synthetic_root, str(tmp_path / "run"),
                      **{"train.device": "cuda", "train.precision": "bf16",
                         "model.teacher_name": "dinov2_vitb14", "model.teacher_img_size": 56,
                         "model.teacher_kwargs": {"init_values": 1.0}})
    run = distill_trainer.build_run(cfg, DistInfo(), CUDA)
    assert isinstance(run.teacher, HeldTeacher)
    torch.manual_seed(cfg.train.seed)
    reference = build_teacher(cfg.model, CUDA)
    params = sample_view_params(16, torch.Generator().manual_seed(1)).to(CUDA)
    x = model_inputs(run.data.train_images[:16], params, cfg.model.student_img_size,
                     cfg.model.teacher_img_size)[1]
    with autocast(CUDA, torch.bfloat16):
        expected = reference(x)
    for got, want in zip(run.teacher(x), expected):
        cosine = F.cosine_similarity(got.reshape(-1, 768).float(), want.reshape(-1, 768).float(),
                                     dim=-1)
        assert cosine.min() >= 0.999, cosine.min()
