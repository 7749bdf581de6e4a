"""The method's levers (issue 21), each a config choice: it trains, resumes bit-identically on
CPU, logs its terms by name, and its checkpoint is probed by the evaluator; a mistake in each new
key is one line. Also (issue 20): a loss defined in this file only trains, logs and plots through
the real code paths.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import config
import distill_loss
import distill_trainer
import evaluate_checkpoints as ev
from config import config_from_dict
from distributed import DistInfo
from helpers import tiny_config, tiny_overrides
from train_step import make_train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# A plain (non-DINOv2) tiny ViT teacher: without LayerScale its random features vary with the
# input, so there is something to learn in three epochs.
VARIED_TEACHER = {"model.teacher_name": "vit_small_patch16_224", "train.learning_rate": 2e-3}
# lever -> (overrides, the criterion's term names, what must move besides the student)
LEVERS = {
    "mse": ({"train.distill_loss": "mse"}, ("cls", "patch"), None),
    "smooth_l1": ({"train.distill_loss": "smooth_l1"}, ("cls", "patch"), None),
    "mix": (
        {"train.distill_loss": {"cosine": 0.9, "smooth_l1": 0.1}},
        ("cls_cosine", "cls_smooth_l1", "patch_cosine", "patch_smooth_l1"),
        None,
    ),
    "mlp": (
        {"model.projection": "mlp", "model.projection_hidden_dim": 48},
        ("cls", "patch"),
        "projection",
    ),
    "mlp_shared": (
        {"model.projection": "mlp", "model.projection_heads": "shared"},
        ("cls", "patch"),
        "projection",
    ),
    "blocks2_concat": ({"model.teacher_blocks": [-2, -1]}, ("cls", "patch"), None),
    "blocks2_mean": (
        {"model.teacher_blocks": [-2, -1], "model.teacher_blocks_combine": "mean"},
        ("cls", "patch"),
        None,
    ),
    "plus_ce": ({"train.ce_weight": 1.0}, ("cls", "patch", "ce"), "head"),
}
EPOCHS = {"train.num_epochs": 3, "train.save_epochs": [3]}


def train(root, run_dir, extra):
    return distill_trainer.main(["--override", *tiny_overrides(root, str(run_dir), **extra)])


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "epoch" in r]


def load(run_dir, name="checkpoint_epoch_3.pth"):
    return torch.load(os.path.join(run_dir, name), weights_only=True)


@pytest.mark.parametrize("lever", sorted(LEVERS))
@pytest.mark.slow  # end-to-end: trainer (and evaluator) runs
def test_lever_trains_logs_its_terms_and_resumes_exactly(tmp_path, synthetic_root, lever):
    values, terms, moves = LEVERS[lever]
    extra = {**VARIED_TEACHER, **EPOCHS, **values}
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(synthetic_root, straight, extra) == 0
    assert train(synthetic_root, split, {**extra, "train.stop_after_epoch": 1}) == 0
    assert train(synthetic_root, split, extra) == 0
    log = read_log(straight)
    keys = [f"loss_{t}" for t in terms]
    # Exactly the criterion's terms, in order.
    assert [k for k in log[1] if k.startswith("loss_")] == keys
    assert all(log[0][k] is None for k in ["loss", *keys])
    assert log[-1]["loss"] < log[1]["loss"], [r["loss"] for r in log]  # it learns
    a, b = load(straight), load(split)
    for part in ("student", "projection", "head"):
        assert (a[part] is None) == (b[part] is None), part
        for key in a[part] or {}:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert [r["loss"] for r in read_log(split)] == [r["loss"] for r in log]
    # A learned adapter or the label head is trained and saved, apart from the student.
    if moves is not None:
        first = load(straight, "checkpoint_epoch_3.pth")[moves]
        cfg = tiny_config(synthetic_root, str(tmp_path / "fresh"), **extra)
        fresh = distill_trainer.build_run(cfg, DistInfo(), torch.device("cpu")).trainable
        init = (fresh.criterion if moves == "projection" else fresh.head).state_dict()
        assert set(first) == set(init) and any(not torch.equal(first[k], init[k]) for k in init)
        assert not set(a["student"]) & set(first)


@pytest.mark.parametrize("lever", sorted(LEVERS))
@pytest.mark.slow  # end-to-end: trainer (and evaluator) runs
def test_evaluator_probes_the_student_of_a_lever_checkpoint(tmp_path, synthetic_root, lever):
    """The probe sees the student alone: the same accuracies with the adapters and the head
    removed from the file; cos(P s, t) reads the checkpoint's adapter where its targets are the
    teacher's last block."""
    values, _, _ = LEVERS[lever]
    run_dir, bare_dir = tmp_path / "run", tmp_path / "bare"
    one_epoch = {**VARIED_TEACHER, **values, "train.num_epochs": 1, "train.save_epochs": [1]}
    assert train(synthetic_root, run_dir, one_epoch) == 0
    ckpt = load(run_dir, "checkpoint_epoch_1.pth")
    assert (ckpt["head"] is not None) == (lever == "plus_ce") and ckpt["projection"] is not None
    bare_dir.mkdir()
    torch.save({**ckpt, "projection": None, "head": None}, bare_dir / "checkpoint_epoch_1.pth")
    entries = []
    for directory in (run_dir, bare_dir):
        out = tmp_path / f"{directory.name}.json"
        argv = ["--checkpoint_dir", str(directory), "--device", "cpu", "--output_file", str(out)]
        assert ev.main(argv) == 0
        entries.append(json.load(open(out))["entries"][0])
    full, bare = entries
    assert full["name"] == "epoch_1" and 0 <= full["linear_acc"] <= 100
    assert (full["linear_acc"], full["knn_acc"]) == (bare["linear_acc"], bare["knn_acc"])
    cos = full["diagnostics"]["student_teacher_cos"]
    assert (cos is None) == lever.startswith("blocks2")
    assert bare["diagnostics"]["student_teacher_cos"] is None


def test_mlp_adapter_shape_sharing_and_seeded_init():
    loss = distill_loss.DistillLoss(
        8, 12, (3, 3), (4, 4), {"cls": 1.0, "patch": 0.5}, "mlp", 5, hidden_dim=20
    )
    assert [type(m).__name__ for m in loss.cls_proj] == ["LayerNorm", "Linear", "GELU", "Linear"]
    assert loss.cls_proj[1].out_features == 20 and loss.cls_proj[3].out_features == 12
    assert all(p.requires_grad for p in loss.parameters())
    torch.manual_seed(123)  # the global stream does not decide the adapter's init
    again = distill_loss.DistillLoss(
        8, 12, (3, 3), (4, 4), {"cls": 1.0, "patch": 0.5}, "mlp", 5, hidden_dim=20
    )
    assert all(
        torch.equal(x, y) for x, y in zip(loss.state_dict().values(), again.state_dict().values())
    )
    assert not torch.equal(loss.cls_proj[1].weight, loss.patch_proj[1].weight)  # separate heads
    shared = distill_loss.DistillLoss(
        8, 12, (3, 3), (4, 4), {"cls": 1.0, "patch": 0.5}, "mlp", 5, shared_head=True
    )
    assert shared.cls_proj is shared.patch_proj
    assert len(list(shared.parameters())) == len(list(shared.cls_proj.parameters()))


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("mse", lambda a, b: ((a - b) ** 2).mean()),
        (
            "smooth_l1",
            lambda a, b: torch.where(
                (a - b).abs() < 1, 0.5 * (a - b) ** 2, (a - b).abs() - 0.5
            ).mean(),
        ),
    ],
)
def test_distances_and_a_weighted_mix(spec, expected):
    torch.manual_seed(0)
    s_cls, s_patch = torch.randn(4, 8), torch.randn(4, 9, 8)
    t_cls, t_patch = torch.randn(4, 12) * 2, torch.randn(4, 16, 12) * 2
    one = distill_loss.DistillLoss(
        8, 12, (3, 3), (4, 4), {"cls": 1.0, "patch": 0.5}, distances=spec
    )
    total, lc, lp = one(s_cls, s_patch, t_cls, t_patch)
    assert torch.allclose(lc, expected(one.cls_proj(s_cls), t_cls), rtol=1e-5)
    assert torch.allclose(
        lp, expected(one.patch_proj(s_patch), one.pool_teacher(t_patch)), rtol=1e-5
    )
    assert torch.allclose(total, lc + 0.5 * lp)
    mix = distill_loss.DistillLoss(
        8, 12, (3, 3), (4, 4), {"cls": 1.0, "patch": 0.5}, distances={"cosine": 0.9, spec: 0.1}
    )
    total, c_cos, c_d, p_cos, p_d = mix(s_cls, s_patch, t_cls, t_patch)
    assert mix.term_names == ("cls_cosine", f"cls_{spec}", "patch_cosine", f"patch_{spec}")
    assert torch.allclose(c_d, lc) and torch.allclose(p_d, lp)
    assert torch.allclose(total, 0.9 * c_cos + 0.1 * c_d + 0.5 * (0.9 * p_cos + 0.1 * p_d))


def test_teacher_blocks_targets_concat_mean_and_last_block_unchanged(tmp_path, synthetic_root):
    from dinov2_patcher import build_teacher

    cfg = tiny_config(synthetic_root, str(tmp_path / "r"), **{"model.teacher_blocks": [-2, -1]})
    torch.manual_seed(0)
    teacher = build_teacher(cfg.model, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    last_cls, last_patch = teacher(x)
    teacher.set_target_blocks([-2, -1], "concat")
    cls, patch = teacher(x)
    assert teacher.target_dim == 64 and cls.shape == (2, 64) and patch.shape == (2, 16, 64)
    assert torch.equal(cls[:, 32:], last_cls) and torch.equal(patch[:, :, 32:], last_patch)
    backbone = teacher.backbone  # block -2 through the final norm, as the last block's tokens are
    tokens = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(x)))
    first = backbone.norm(backbone.blocks[0](tokens))
    assert torch.allclose(cls[:, :32], first[:, 0], atol=1e-6)
    teacher.set_target_blocks([-2, -1], "mean")
    cls_mean, _ = teacher(x)
    assert teacher.target_dim == 32 and torch.allclose(
        cls_mean, (first[:, 0] + last_cls) / 2, atol=1e-6
    )


def test_teacher_cache_key_names_the_target_blocks(tmp_path, synthetic_root):
    import teacher_cache
    from dinov2_patcher import build_teacher

    keys = []
    for blocks in ([-1], [-2, -1]):
        cfg = tiny_config(synthetic_root, str(tmp_path / "r"), **{"model.teacher_blocks": blocks})
        torch.manual_seed(0)
        teacher = build_teacher(cfg.model, torch.device("cpu"), targets=True)
        keys.append(
            teacher_cache.cache_key(
                cfg, teacher, (3, 3), torch.zeros(4, 3, 32, 32, dtype=torch.uint8), None
            )
        )
    assert "targets" not in keys[0]  # caches built before the key existed keep their hash
    assert keys[1]["targets"] == {"blocks": [-2, -1], "combine": "concat", "dim": 64}
    assert teacher_cache.key_hash(keys[0]) != teacher_cache.key_hash(keys[1])


@pytest.mark.slow  # end-to-end: trainer (and evaluator) runs
def test_cached_multi_block_targets_train(tmp_path, synthetic_root):
    extra = {
        **VARIED_TEACHER,
        "model.teacher_blocks": [-2, -1],
        "train.cache_teacher_features": True,
        "train.teacher_cache_views": 2,
    }
    assert train(synthetic_root, tmp_path / "run", extra) == 0
    (cache,) = os.listdir(tmp_path / "teacher_cache")
    meta = json.load(open(tmp_path / "teacher_cache" / cache / "meta.json"))
    assert meta["shape"][-1] == 64 and meta["key"]["targets"]["blocks"] == [-2, -1]


@pytest.fixture
def toy_registry(monkeypatch):
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(distill_loss, "DISTANCES", dict(distill_loss.DISTANCES))
    monkeypatch.setattr(config, "DISTILL_LOSSES", set(config.DISTILL_LOSSES))


@pytest.mark.slow  # end-to-end: trainer (and evaluator) runs
def test_a_loss_defined_here_trains_logs_and_plots(tmp_path, synthetic_root, toy_registry, capsys):
    """Issue 20: a new distance is one function and one config choice; nothing else is edited."""

    @distill_loss.register_distance("toy_l1")
    def toy_l1(a, b):
        return (a.float() - b.float()).abs().mean()

    run_dir = tmp_path / "run"
    extra = {**VARIED_TEACHER, **EPOCHS, "train.distill_loss": {"cosine": 0.5, "toy_l1": 0.5}}
    assert train(synthetic_root, run_dir, extra) == 0
    log = read_log(run_dir)
    assert (
        log[-1]["loss_cls_toy_l1"] < log[1]["loss_cls_toy_l1"] and log[-1]["loss"] < log[1]["loss"]
    )
    out = tmp_path / "eval.json"
    assert (
        ev.main(["--checkpoint_dir", str(run_dir), "--device", "cpu", "--output_file", str(out)])
        == 0
    )
    entries = json.load(open(out))["entries"]
    cfg = config_from_dict(load(run_dir)["config"], "stored")
    _, bottom = ev.plot(entries, str(run_dir), cfg).axes
    labels = {line.get_label(): line for line in bottom.get_lines()}
    assert {"training loss", "term cls_toy_l1", "term patch_cosine"} <= set(labels)
    assert list(labels["term cls_toy_l1"].get_ydata()) == [r["loss_cls_toy_l1"] for r in log[1:]]
    assert "toy_l1" in bottom.get_title()


def test_the_registry_and_the_config_choices_agree():
    assert set(distill_loss.DISTANCES) == config.BUILTIN_DISTILL_LOSSES == config.DISTILL_LOSSES


def test_default_criterion_terms_and_description_are_todays():
    cfg = config.TrainConfig()
    assert distill_loss.term_names(cfg) == ("cls", "patch")
    default = "1·(1−cos) CLS + 0.5·(1−cos) patch tokens, vs the teacher"
    assert distill_loss.describe(cfg) == default
    assert distill_loss.term_names(config.TrainConfig(objective="supervised")) == ("ce",)
    mixed = config.TrainConfig(distill_loss={"cosine": 0.9, "smooth_l1": 0.1}, ce_weight=0.5)
    assert distill_loss.describe(mixed) == (
        "1·(0.9·(1−cos) + 0.1·smooth-L1) CLS + 0.5·(0.9·(1−cos) + "
        "0.1·smooth-L1) patch tokens, vs the teacher + 0.5·cross-entropy on "
        "labels"
    )


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.distill_loss=l2", "unknown distance 'l2'"),
        ("train.distill_loss={cosine: -1}", "weights >= 0"),
        ("train.distill_loss={}", "use one of cosine, mse, smooth_l1"),
        ("train.ce_weight=-1", "'train.ce_weight' must be >= 0"),
        (
            "train.objective=supervised;train.ce_weight=1",
            "supervised objective is cross-entropy already",
        ),
        ("model.projection=mlp2", "'model.projection' must be one of frozen, learned, mlp"),
        ("model.projection_hidden_dim=0", "'model.projection_hidden_dim' must be > 0"),
        ("model.projection_hidden_dim=64", "is the mlp adapter's width"),
        ("model.projection_heads=both", "'model.projection_heads' must be one of separate, shared"),
        ("model.teacher_blocks=[]", "non-empty list of distinct block indices"),
        ("model.teacher_blocks=[-1,-1]", "non-empty list of distinct block indices"),
        ("model.teacher_blocks=-1", "'model.teacher_blocks' must be a list of an integer"),
        (
            "model.teacher_blocks_combine=sum",
            "'model.teacher_blocks_combine' must be one of concat, mean",
        ),
        ("model.teacher_blocks=[-3,-1]", "the teacher has 2 blocks; use indices from -2 to 1"),
        ("model.teacher_blocks=[1,-1]", "names a block twice"),
    ],
)
def test_lever_key_mistakes_are_one_line(tmp_path, synthetic_root, capsys, override, needle):
    argv = [
        "--override",
        *tiny_overrides(synthetic_root, str(tmp_path / "run")),
        *override.split(";"),
    ]
    assert distill_trainer.main(argv) == 2
    err = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.strip() and "RANDOMLY INITIALISED" not in line and "Warning" not in line
    ]
    assert len(err) == 1 and needle in err[0], err
    assert not os.path.exists(tmp_path / "run" / "checkpoint_latest.pth")


ARM_FILES = {
    "kd_mse": {"train.distill_loss": "mse"},
    "kd_mix": {"train.distill_loss": {"cosine": 0.9, "smooth_l1": 0.1}},
    "kd_mlp": {"model.projection": "mlp"},
    "kd_blocks2": {"model.teacher_blocks": [-2, -1]},
    "kd_plus_ce": {"train.ce_weight": 1.0},
}


@pytest.mark.parametrize("arm", sorted(ARM_FILES))
def test_each_lever_arm_file_changes_its_lever_only(arm):
    import run_experiments
    from config import replace_values
    from helpers import CONFIG_FILES

    base = config.load_config(*CONFIG_FILES)
    path = run_experiments.arm_file(arm)
    cfg = replace_values(base, config.read_yaml(path), path)
    changed = {
        f"{s}.{k}": v
        for s, values in cfg.to_dict().items()
        for k, v in values.items()
        if base.to_dict()[s][k] != v
    }
    assert changed == ARM_FILES[arm]
    # The labels-assisted arm says so.
    assert ("USES LABELS" in open(path).read()) == (arm == "kd_plus_ce")


def test_mix_weights_take_scientific_notation():
    from config import build_section

    train = build_section(
        "train", {"distill_loss": {"cosine": "9.0e-1", "smooth_l1": "1e-1"}}, "x.yaml"
    )
    assert train.distill_loss == {"cosine": 0.9, "smooth_l1": 0.1}


def test_held_teacher_returns_the_target_blocks(tmp_path, synthetic_root):
    from dinov2_patcher import build_teacher
    from models import hold_teacher

    cfg = tiny_config(synthetic_root, str(tmp_path / "r"), **{"model.teacher_blocks": [-2, -1]})
    torch.manual_seed(0)
    held = hold_teacher(build_teacher(cfg.model, torch.device("cpu"), targets=True), torch.bfloat16)
    cls, patch = held(torch.randn(2, 3, 32, 32))
    assert held.target_dim == 64 and cls.shape == (2, 64) and patch.shape == (2, 16, 64)


class StopAfter:
    """The trainer's StopSignal, asked for a stop once `steps` steps have looked at it."""

    def __init__(self, steps):
        self.steps, self.interrupted = steps, False

    @property
    def requested(self):
        self.steps -= 1
        return self.steps < 0


@pytest.mark.slow  # end-to-end: trainer (and evaluator) runs
def test_supervised_checkpoint_with_the_old_loss_columns_resumes_mid_epoch(
    tmp_path, synthetic_root
):
    """Supervised checkpoints written before the terms were named hold epoch sums [loss, ce, 0,
    steps]; resumed mid-epoch they give the epoch mean of an uninterrupted run."""
    extra = {"train.objective": "supervised", "train.num_epochs": 1, "train.save_epochs": [1]}
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert train(synthetic_root, straight, extra) == 0
    cfg = tiny_config(synthetic_root, split, **extra)
    os.makedirs(split)
    run = distill_trainer.build_run(cfg, DistInfo(), torch.device("cpu"))
    result = distill_trainer.train_one_epoch(
        run, make_train_step(run), distill_trainer.Position(0, 0, 0), StopAfter(3)
    )
    assert result.stopped and 0 < result.steps_done < run.steps_per_epoch
    latest = os.path.join(split, "checkpoint_latest.pth")
    ckpt = torch.load(latest, weights_only=True)
    assert ckpt["epoch_sums"].shape == (3,)  # loss, ce, steps
    loss, ce, steps = ckpt["epoch_sums"].tolist()
    torch.save({**ckpt, "epoch_sums": torch.tensor([loss, ce, 0.0, steps])}, latest)
    assert train(synthetic_root, split, extra) == 0
    assert read_log(split)[-1]["loss_ce"] == pytest.approx(
        read_log(straight)[-1]["loss_ce"], rel=1e-6
    )
    assert read_log(split)[-1]["loss"] == pytest.approx(read_log(straight)[-1]["loss"], rel=1e-6)


def test_uses_labels_marks_the_label_arms():
    assert not distill_loss.uses_labels(config.TrainConfig())
    assert distill_loss.uses_labels(config.TrainConfig(ce_weight=1.0))
    assert distill_loss.uses_labels(config.TrainConfig(objective="supervised"))
