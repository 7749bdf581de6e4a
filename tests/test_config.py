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
    ("train_config_kd", "compile", "yes", "one of false, true, default"),
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


@pytest.mark.parametrize(
    "override,needle",
    [
        (
            "train.num_epochs=abc",
            "--override train.num_epochs=abc: key 'train.num_epochs' must be an integer",
        ),
        ("train.nope=1", "unknown key 'train.nope'"),
        ("optim.lr=1", "unknown section 'optim'"),
        ("train.batch_size", "expected SECTION.KEY=VALUE"),
    ],
)
def test_bad_override(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(*FILES, [override])
    assert needle in str(e.value)


def test_override_goes_through_validation_and_applies():
    cfg = load_config(
        *FILES,
        [
            "train.num_epochs=3", "train.save_epochs=[1, 3]", "model.teacher_pretrained=false",
            "train.warmup_epochs=1",
        ],
    )
    assert (
        cfg.train.num_epochs == 3
        and cfg.train.save_epochs == [1, 3]
        and cfg.model.teacher_pretrained is False
    )
    assert isinstance(cfg.train.warmup_epochs, float)


@pytest.mark.parametrize(
    "value",
    [1e-6, 5.0e-4, 3, True, None, "imagefolder", [1, 10], {"cls": 1.0, "patch": 0.0}, "yes"],
)
def test_override_text_round_trips(value):
    from config import parse_override
    from helpers import override_text
    assert parse_override(override_text("train.x", value)) == ("train", "x", value)


def test_diag_batch_size_needs_two_images():
    with pytest.raises(ConfigError, match="diag_batch_size' must be >= 2"):
        load_config(*FILES, ["train.diag_batch_size=1"])


# ----------------------------------------------------------------- issue 13
def test_scientific_notation_is_a_number_where_a_number_is_expected(tmp_path):
    """PyYAML reads 1e-3 as a string; written as users write it, it is a number for float keys (item
    10)."""
    text = (
        open("train_config_kd.yaml").read().replace("learning_rate: 5.0e-4", "learning_rate: 1e-3")
    )
    assert "learning_rate: 1e-3" in text
    (tmp_path / "train.yaml").write_text(text)
    cfg = load_config(FILES[0], str(tmp_path / "train.yaml"), FILES[2],
                      ["train.min_lr=1E-7", "train.weight_decay=+4e-2",
                       "train.distill_loss_weights={cls: 1e0, patch: .5e0}",
                       "model.student_kwargs={init_values: 1e-5}"])
    assert cfg.train.learning_rate == 1e-3 and isinstance(cfg.train.learning_rate, float)
    assert (cfg.train.min_lr, cfg.train.weight_decay) == (1e-7, 0.04)
    assert cfg.train.distill_loss_weights == {"cls": 1.0, "patch": 0.5}
    assert cfg.model.student_kwargs == {"init_values": 1e-5}  # timm would get the string '1e-5'


@pytest.mark.parametrize("override,needle", [
    ("train.learning_rate=fast", "'train.learning_rate' must be a number, got 'fast'"),
    ("train.learning_rate=1e-3x", "'train.learning_rate' must be a number, got '1e-3x'"),
    ("train.learning_rate=1e", "'train.learning_rate' must be a number, got '1e'"),
    ("train.batch_size=1e3", "'train.batch_size' must be an integer, got '1e3'"),
])
def test_strings_that_are_not_numbers_are_still_refused(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(*FILES, [override])
    assert needle in str(e.value)


def test_path_keys_are_expanded_and_stored_absolute(tmp_path, monkeypatch):
    """~ in any path key is the home folder, a relative path is made absolute at load (items 8,
    11)."""
    from helpers import CONFIG_FILES
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        *CONFIG_FILES,
        [
            "data.dataset_root=data/cifar10-jpeg", "data.cache_dir=~/cache",
            "train.checkpoint_dir=~/runs/kd", "model.teacher_weights=~/w/dinov2.pth",
        ],
    )
    home = tmp_path / "home"
    assert cfg.data.dataset_root == str(tmp_path / "data" / "cifar10-jpeg")
    assert (cfg.data.cache_dir, cfg.train.checkpoint_dir) == (
        str(home / "cache"),
        str(home / "runs" / "kd"),
    )
    assert cfg.model.teacher_weights == str(home / "w" / "dinov2.pth")
    # the shipped ./data
    assert load_config(*CONFIG_FILES).data.dataset_root == str(tmp_path / "data")


def test_kwargs_without_values_are_refused_in_files(tmp_path):
    """YAML reads {embed_dim:32} as a key 'embed_dim:32' without a value; timm would drop it, build
    ViT-S (item 1)."""
    paths = write_configs(tmp_path)
    with open(paths[2], "a") as f:
        f.write("student_kwargs: {embed_dim:64, num_heads: 4}\n")
    with pytest.raises(ConfigError) as e:
        load_config(*paths)
    assert (
        str(e.value)
        == f"{paths[2]}: key 'model.student_kwargs' has no value for 'embed_dim:64'; YAML needs a "
        "space after each colon ({embed_dim: 64}); remove a key to get timm's default"
    )


def test_consistency_errors_name_where_each_value_came_from(tmp_path):
    """The culprit's file or --override is named, and the suggested fix is a valid one (item 14)."""
    paths = write_configs(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(*paths, ["train.num_epochs=5"])
    assert (
        str(e.value)
        == f"{paths[1]}: key 'train.save_epochs' has [10, 20, 50] beyond train.num_epochs=5 "
        "(--override train.num_epochs=5); drop them or raise num_epochs, e.g. "
        "--override train.save_epochs=[1,5]"
    )
    with pytest.raises(ConfigError) as e:
        load_config(*paths, ["model.student_img_size=128"])
    assert str(e.value).startswith(
        f"{paths[0]}: key 'data.image_size'=96 must equal model.student_img_size=128 "
        "(--override model.student_img_size=128)"
    )


def test_config_changes_tell_result_keys_from_harmless_ones():
    """What a resume compares (item 2): every key; older checkpoints lack newer keys and stored
    relative paths."""
    import copy
    from config import HARMLESS_KEYS, SECTIONS, config_changes
    requested = load_config(*FILES).to_dict()
    stored = copy.deepcopy(requested)
    stored["train"].update(learning_rate=1e-3, log_every=10, save_epochs=[1, 10], an_old_key=3)
    stored["model"]["distill_weights_were_here"] = None
    stored["data"]["dataset_root"] = "./data"  # as typed, relative: how older versions stored it
    # keys added after that checkpoint
    del stored["train"]["cuda_graphs"], stored["model"]["target_norm"]
    refused, harmless = config_changes(stored, requested)
    assert refused == {"train.learning_rate": (1e-3, 5e-4)}
    assert harmless == {
        "train.log_every": (10, 50),
        "train.save_epochs": ([1, 10], [1, 10, 20, 50]),
    }
    assert config_changes(requested, requested) == ({}, {})
    fields = {f"{s}.{k}" for s, cls in SECTIONS.items() for k in cls.__dataclass_fields__}
    assert HARMLESS_KEYS <= fields


def test_warnings_are_one_line_inside_the_entry_scripts():
    """warnings.warn's default format adds the source line; the scripts print `warning: MESSAGE`
    (item 13)."""
    import warnings
    from config import one_line_warnings
    before = warnings.formatwarning
    with one_line_warnings():
        assert (
            warnings.formatwarning("cache is\n   corrupt", UserWarning, "/x/data_loader.py", 12)
            == "warning: cache is corrupt\n"
        )
    assert warnings.formatwarning is before


def test_checkpoints_stored_with_null_kwargs_still_load():
    """Before item 1, {embed_dim:32} trained a full model (timm dropped the null key): reading such
    a checkpoint's config gives that model, not an error."""
    from config import config_from_dict
    stored = load_config(*FILES).to_dict()
    stored["model"]["student_kwargs"] = {"embed_dim:32": None, "depth": 2}
    assert config_from_dict(stored, "ckpt").model.student_kwargs == {"depth": 2}
