from __future__ import annotations

import pytest
import yaml

from config import ConfigError, load_config

FILES = ("data_config.yaml", "train_config_kd.yaml", "model_config_kd.yaml")


def write_configs(tmp_path, **edits):
    """Copies the repo's three configs to tmp_path, applying {file_stem: {key: value}} edits."""
    paths = []
    for name in FILES:
        with open(name) as f:
            values = yaml.safe_load(f)
        values.update(edits.get(name.split(".")[0], {}))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(values))
        paths.append(str(path))
    return paths


def test_repo_configs_load_with_method_defaults():
    cfg = load_config(*FILES)
    assert cfg.train.batch_size == 64 and cfg.train.learning_rate == 5e-4
    assert cfg.train.distill_loss_weights == {"cls": 1.0, "patch": 0.5}
    assert cfg.model.teacher_name == "dinov2_vitb14" and cfg.model.teacher_img_size == 224
    assert cfg.model.student_img_size == 96 and cfg.model.projection == "frozen"
    assert cfg.train.save_epochs == [1, 10, 20, 50]


@pytest.mark.parametrize("stem,key,value,needle", [
    ("data_config", "dataset_nme", "cifar10", "did you mean 'dataset_name'"),
    ("train_config_kd", "bach_size", 8, "did you mean 'batch_size'"),
    ("model_config_kd", "teacher_nam", "x", "did you mean 'teacher_name'"),
    ("train_config_kd", "batch_size", "64", "must be an integer"),
    ("train_config_kd", "learning_rate", "fast", "must be a number"),
    ("train_config_kd", "compile", "yes", "true/false"),
    ("train_config_kd", "batch_size", 0, "must be > 0"),
    ("train_config_kd", "num_epochs", -1, "must be > 0"),
    ("train_config_kd", "learning_rate", -1e-3, "must be > 0"),
    ("train_config_kd", "save_epochs", [1, 60], "beyond train.num_epochs"),
    ("train_config_kd", "objective", "contrastive", "one of distill, supervised"),
    ("model_config_kd", "projection", "random", "one of frozen, learned"),
    ("train_config_kd", "distill_loss_weights", {"cls": 1.0}, "{cls: W, patch: W}"),
])
def test_bad_value_names_file_and_key(tmp_path, stem, key, value, needle):
    paths = write_configs(tmp_path, **{stem: {key: value}})
    with pytest.raises(ConfigError) as e:
        load_config(*paths)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and f"{stem}.yaml" in msg


def test_yaml_syntax_error_names_line(tmp_path):
    paths = write_configs(tmp_path)
    with open(paths[1], "a") as f:
        f.write("batch_size: [64\n")
    with pytest.raises(ConfigError, match=r"train_config_kd.yaml: YAML syntax error at line \d+"):
        load_config(*paths)


@pytest.mark.parametrize("override,needle", [
    ("train.num_epochs=abc", "--override train.num_epochs=abc: key 'train.num_epochs' must be an integer"),
    ("train.nope=1", "unknown key 'train.nope'"),
    ("optim.lr=1", "unknown section 'optim'"),
    ("train.batch_size", "expected SECTION.KEY=VALUE"),
])
def test_bad_override(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(*FILES, [override])
    assert needle in str(e.value)


def test_override_goes_through_validation_and_applies():
    cfg = load_config(*FILES, ["train.num_epochs=3", "train.save_epochs=[1, 3]", "model.teacher_pretrained=false",
                               "train.warmup_epochs=1"])
    assert cfg.train.num_epochs == 3 and cfg.train.save_epochs == [1, 3] and cfg.model.teacher_pretrained is False
    assert isinstance(cfg.train.warmup_epochs, float)


@pytest.mark.parametrize("value", [1e-6, 5.0e-4, 3, True, None, "imagefolder", [1, 10], {"cls": 1.0, "patch": 0.0},
                                   "yes"])
def test_override_text_round_trips(value):
    from config import parse_override
    from helpers import override_text
    assert parse_override(override_text("train.x", value)) == ("train", "x", value)


def test_diag_batch_size_needs_two_images():
    with pytest.raises(ConfigError, match="diag_batch_size' must be >= 2"):
        load_config(*FILES, ["train.diag_batch_size=1"])
