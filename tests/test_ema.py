"""train.ema_decay: the student's EMA is updated after every step, saved as student_ema, resumed
exactly and probed by the evaluator (CPU, tiny models)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import distill_trainer
import evaluate_checkpoints as ev
from config import ConfigError, UserError
from distributed import DistInfo
from helpers import tiny_config, tiny_overrides
from train_step import cuda_graphs_enabled, make_train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
DECAY = 0.9  # short runs: a decay this low lets the EMA move visibly in a few steps


def train(tmp_path, synthetic_root, name, **extra):
    run_dir = str(tmp_path / name)
    code = distill_trainer.main(["--override", *tiny_overrides(synthetic_root, run_dir, **extra)])
    assert code == 0
    return run_dir


def load(run_dir, epoch):
    return torch.load(os.path.join(run_dir, f"checkpoint_epoch_{epoch}.pth"), weights_only=True)


def test_ema_follows_the_student_step_by_step(tmp_path, synthetic_root):
    """After each step ema = lerp(ema, student, 1 - decay), starting from the student's init."""
    cfg = tiny_config(synthetic_root, str(tmp_path / "r"), **{"train.ema_decay": DECAY})
    run = distill_trainer.build_run(cfg, DistInfo(), CPU)
    student = run.trainable.student
    expected = {k: v.clone() for k, v in student.state_dict().items()}
    assert all(torch.equal(v, run.ema.state_dict()[k]) for k, v in expected.items())
    assert not any(p.requires_grad for p in run.ema.parameters())
    step = make_train_step(run)
    indices, params, _ = distill_trainer.epoch_batches(run, 0)
    for i in range(3):
        step(indices[i], params[i], i)
        for k, v in student.state_dict().items():
            expected[k] = torch.lerp(expected[k], v, 1.0 - DECAY)
    ema, now = run.ema.state_dict(), student.state_dict()
    for k in expected:
        assert torch.allclose(ema[k], expected[k], rtol=0, atol=1e-6), k
    assert any(not torch.equal(ema[k], now[k]) for k in ema)  # an EMA, not a copy of the student


def test_default_run_has_no_ema(tmp_path, synthetic_root):
    cfg = tiny_config(synthetic_root, str(tmp_path / "r"))
    assert cfg.train.ema_decay is None
    assert distill_trainer.build_run(cfg, DistInfo(), CPU).ema is None


def test_ema_resumes_bit_identically(tmp_path, synthetic_root):
    """2 + 2 epochs (stopped and resumed) give the same student_ema, bit for bit, as 4 straight."""
    extra = {"train.num_epochs": 4, "train.save_epochs": [2, 4], "train.ema_decay": DECAY}
    straight = train(tmp_path, synthetic_root, "straight", **extra)
    split = train(tmp_path, synthetic_root, "split", **extra, **{"train.stop_after_epoch": 2})
    train(tmp_path, synthetic_root, "split", **extra)
    a, b = load(straight, 4), load(split, 4)
    assert set(a["student_ema"]) == set(a["student"])  # a student state_dict: exporters load it
    for key in a["student_ema"]:
        assert torch.equal(a["student_ema"][key], b["student_ema"][key]), key
        assert torch.equal(a["student"][key], b["student"][key]), key
    at_2 = load(straight, 2)["student_ema"]
    moved = [k for k in a["student_ema"] if not torch.equal(a["student_ema"][k], at_2[k])]
    assert moved  # the EMA kept moving after the resume point


def test_ema_checkpoint_is_probed_and_says_so(tmp_path, synthetic_root, capsys):
    run_dir = train(tmp_path, synthetic_root, "ema", **{"train.ema_decay": DECAY})
    assert load(run_dir, 2)["student_ema"] is not None
    plain_dir = str(tmp_path / "plain")
    os.makedirs(plain_dir)
    ckpt = load(run_dir, 2)
    ckpt["student_ema"] = None  # the same run, its raw student weights
    torch.save(ckpt, os.path.join(plain_dir, "checkpoint_epoch_2.pth"))
    ema_entry = ev.evaluate_run(ev.options(run_dir, epochs=[2], device="cpu"))[0]
    plain_entry = ev.evaluate_run(ev.options(plain_dir, epochs=[2], device="cpu"))[0]
    asked = ev.evaluate_run(ev.options(run_dir, epochs=[2], device="cpu", weights="student",
                                       output_file=str(tmp_path / "raw.json")))[0]
    out = capsys.readouterr().out
    # --weights student probes the same raw weights as a checkpoint without an EMA
    assert asked["weights"] == "student" and asked["linear_acc"] == plain_entry["linear_acc"]
    assert asked["diagnostics"] == plain_entry["diagnostics"]
    assert ema_entry["weights"] == "student_ema" and ema_entry["ema_decay"] == DECAY
    assert plain_entry["weights"] == "student" and plain_entry["ema_decay"] is None
    # Different weights, different features: the EMA was what got probed.
    rank = "effective_rank"
    assert ema_entry["diagnostics"][rank] != plain_entry["diagnostics"][rank]
    assert "epoch_2 (EMA weights): linear" in out
    saved = json.load(open(os.path.join(run_dir, "eval_results.json")))["entries"][0]
    assert saved["weights"] == "student_ema"
    table = open(os.path.join(run_dir, "eval_results.md")).read()
    assert f"| EMA {DECAY:g} |" in table


def test_default_checkpoint_stores_no_ema(tmp_path, synthetic_root):
    run_dir = train(tmp_path, synthetic_root, "plain")
    assert load(run_dir, 2)["student_ema"] is None
    entry = ev.evaluate_run(ev.options(run_dir, epochs=[2], device="cpu"))[0]
    assert entry["weights"] == "student"


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "fast"])
def test_bad_ema_decay_is_one_line(tmp_path, value):
    with pytest.raises(ConfigError) as e:
        tiny_config(str(tmp_path), str(tmp_path / "r"), **{"train.ema_decay": value})
    assert "train.ema_decay" in str(e.value) and "\n" not in str(e.value)


def test_ema_refuses_cuda_graphs_true_and_auto_falls_back(tmp_path):
    forced = tiny_config(str(tmp_path), str(tmp_path / "r"),
                         **{"train.ema_decay": 0.999, "train.cuda_graphs": True})
    needle = "train.cuda_graphs=true cannot run train.ema_decay=0.999"
    with pytest.raises(UserError, match=needle) as e:
        cuda_graphs_enabled(forced, DistInfo(), CUDA)
    assert "\n" not in str(e.value)
    auto = tiny_config(str(tmp_path), str(tmp_path / "r"), **{"train.ema_decay": 0.999})
    assert cuda_graphs_enabled(auto, DistInfo(), CUDA) is False


def test_switching_ema_on_for_a_trained_run_is_refused(tmp_path, synthetic_root, capsys):
    run_dir = train(tmp_path, synthetic_root, "run", **{"train.stop_after_epoch": 1})
    argv = ["--override", *tiny_overrides(synthetic_root, run_dir, **{"train.ema_decay": 0.998})]
    capsys.readouterr()
    assert distill_trainer.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "train.ema_decay null -> 0.998" in err[0]


def test_ema_resumes_mid_epoch_bit_identically(tmp_path, synthetic_root, monkeypatch):
    """From a checkpoint_latest written inside an epoch (train.save_every), the resumed run ends
    with the student and student_ema of the uninterrupted run, bit for bit."""
    extra = {"train.ema_decay": DECAY, "train.save_every": 4}  # 6 steps an epoch: global steps 4, 8
    mid_epoch = []
    write = distill_trainer.save_checkpoint

    def keep_mid_epoch_copies(state, path):
        write(state, path)
        if state["step_in_epoch"]:
            mid_epoch.append((state["global_step"], torch.load(path, weights_only=True)))
    monkeypatch.setattr(distill_trainer, "save_checkpoint", keep_mid_epoch_copies)
    straight = train(tmp_path, synthetic_root, "straight", **extra)
    assert [step for step, _ in mid_epoch] == [4, 8]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    torch.save(mid_epoch[1][1], str(resumed / "checkpoint_latest.pth"))  # epoch 2, step 2 of 6
    train(tmp_path, synthetic_root, "resumed", **extra)
    a, b = load(straight, 2), load(str(resumed), 2)
    for part in ("student", "student_ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
