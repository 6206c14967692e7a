"""Config tree: defaults, YAML + dotted overrides, errors naming the key, every shipped YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hpc_drseg.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    describe_fields,
    dump_config,
    load_config,
    parse_overrides,
    save_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Run configs; configs/sweep_*.yaml are sweep specs, validated with every trial's overrides in tests/sweep/test_spec.py.
SHIPPED = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("sweep_"))


def test_defaults_are_the_paper_values():
    cfg = RunConfig()
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == [0.9, 0.999]
    assert (cfg.optim.plateau_factor, cfg.optim.plateau_patience) == (0.5, 5)
    assert (cfg.train.batch_size, cfg.train.max_epochs, cfg.train.early_stop_patience) == (4, 100, 15)
    w = cfg.loss.weights
    assert (w.dice, w.bce, w.focal, w.boundary) == (1.0, 0.5, 1.0, 0.5)
    assert (cfg.loss.focal_alpha, cfg.loss.focal_gamma, cfg.loss.boundary_theta) == (0.25, 2.0, 1.5)
    assert cfg.data.image_px == 512 and cfg.model.output_stride == 32
    assert cfg.model.cbam.sites == ["aspp", "low_level"] and cfg.model.cbam.reduction == 16


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_yaml_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert len(SHIPPED) >= 4


def test_precedence_default_yaml_override(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  lr: 2.0e-4\n  weight_decay: 1e-5\ntrain:\n  seed: 3\n")
    cfg = load_config(path, ["optim.lr=3e-4", "loss.weights.dice=0.25", "model.cbam.sites=[aspp]"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # CLI beats YAML
    assert cfg.optim.weight_decay == pytest.approx(1e-5)  # YAML '1e-5' (a string to PyYAML) becomes a float
    assert cfg.train.seed == 3 and cfg.train.batch_size == 4  # YAML beats default; default kept
    assert cfg.loss.weights.dice == 0.25 and cfg.model.cbam.sites == ["aspp"]


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = load_config(CONFIG_DIR / "debug.yaml", ["optim.lr=5e-4", "loss.pos_weight=[4, 1, 1.5, 2]"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(saved)
    assert again == cfg
    assert not list(saved.parent.glob("*.tmp"))  # atomic write left no temporary file


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; valid keys here: optim.lr"),
        ("modle.name=unet", "unknown key 'modle'"),
        ("optim.lr=fast", "optim.lr: got 'fast'"),
        ("train.batch_size=2.5", "train.batch_size: got 2.5"),
        ("train.channels_last=1", "train.channels_last: got 1"),
        ("model.name=segformer", "choose one of ['attention_deeplab', 'deeplabv3plus', 'unet']"),
        ("model.output_stride=8", "model.output_stride"),
        ("data.image_px=500", "divisible by 32"),
        ("model.cbam.sites=[decoder]", "model.cbam.sites"),
        ("loss.pos_weight=[1, 2]", "one per lesion"),
        ("model.cbam.kernel_size=4", "odd"),
        ("optim", "section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_unknown_key_in_yaml_lists_valid_keys(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'train.max_epoch'.*train.max_epochs"):
        load_config(path)


def test_yaml_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_parse_overrides_nests_and_parses_values():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=text", "e=3e-4"]) == {
        "a": {"b": 1, "c": [1, 2]},
        "d": "text",
        "e": pytest.approx(3e-4),
    }


def test_yaml_boolean_words_reach_string_choices(tmp_path):
    """YAML 1.1 reads `no` as False: precision 'no' must still work unquoted, on the command line and in a file."""
    assert load_config(None, ["train.precision=no"]).train.precision == "no"
    path = tmp_path / "fp32.yaml"
    path.write_text("train:\n  precision: no\n")
    assert load_config(path, []).train.precision == "no"
    with pytest.raises(ConfigError, match="train.precision: got True; choose one of"):
        load_config(None, ["train.precision=yes"])  # no choice spells True


def test_run_dir_defaults_to_config_name():
    cfg = load_config(CONFIG_DIR / "unet.yaml")
    assert cfg.run_dir == Path("runs") / "unet"
    assert load_config(None, ["train.run_dir=/tmp/x"]).run_dir == Path("/tmp/x")


def test_every_field_is_documented():
    rows = describe_fields()
    undocumented = [key for key, _, doc in rows if not doc]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    assert {"optim.lr", "loss.weights.dice", "model.cbam.impl"} <= {key for key, _, _ in rows}


def test_dump_is_plain_yaml():
    loaded = yaml.safe_load(dump_config(config_from_dict({"train": {"seed": 7}})))
    assert loaded["train"]["seed"] == 7 and loaded["model"]["cbam"]["impl"] == "eager"
