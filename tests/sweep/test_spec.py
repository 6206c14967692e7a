"""Sweep specs → trials: validation errors name the key, grid × seeds, random search, overrides, shipped specs."""

from __future__ import annotations

from pathlib import Path

import pytest
from sweep_testkit import DEBUG_YAML, REPO, write_spec

from hpc_drseg.config import ConfigError, load_sweep_config, parse_overrides
from hpc_drseg.sweep.prepare import prepare_sweep
from hpc_drseg.sweep.spec import _override, expand_trials, sweep_points


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"grid": {"loss.weights.dicee": [1.0]}}, "unknown key 'loss.weights.dicee'"),
        ({"grid": {"optim.lr": ["fast"]}}, "optim.lr: got 'fast'"),
        ({"grid": {"loss.weights.dice": [1.0]}, "executr": {}}, "unknown key 'executr'"),
        ({"grid": {"loss.weights.dice": [1.0]}, "executor": {"kind": "pbs"}}, "executor.kind: got 'pbs'"),
        ({"grid": {"loss.weights.dice": []}}, "grid.loss.weights.dice: got []"),
        ({"grid": {"loss.weights.dice": [1.0, 1.0]}}, "a value is repeated"),
        ({"grid": {"train.seed": [1, 2]}}, "list seeds under `seeds`"),
        ({"grid": {"dice": [1.0]}}, "give a dotted run-config key"),
        ({"grid": {"optim.lr": [1e-4]}, "seeds": [0, 0]}, "seeds: got [0, 0]"),
        ({"grid": {"optim.lr": [1e-4]}, "overrides": ["optim.lr=1e-3"]}, "both swept and fixed"),
        (
            {"random": {"trials": 2, "params": [{"key": "optim.lr", "dist": "loguniform", "low": 0, "high": 1}]}},
            "'loguniform' needs low > 0",
        ),
        ({"random": {"trials": 2, "params": [{"key": "optim.lr", "dist": "gauss"}]}}, "choose one of"),
        ({}, "a sweep needs `grid`, `points` or `random`"),
        ({"points": [["model.cbam.sites=[nowhere]"]]}, "model.cbam.sites"),
    ],
)
def test_spec_errors_name_the_key(tmp_path, fields, fragment):
    path = write_spec(tmp_path, **fields)
    with pytest.raises(ConfigError) as info:
        prepare_sweep(load_sweep_config(path))
    assert fragment in str(info.value)
    assert not (tmp_path / "sweep").exists()  # nothing written, nothing submitted


def test_grid_times_seeds_ids_overrides_and_hashes(tmp_path):
    grid = {"loss.weights.dice": [0.5, 1.0], "model.cbam.sites": [["aspp"]], "optim.lr": [1e-4, 3e-5, 1e-3]}
    path = write_spec(tmp_path, grid=grid, seeds=[0, 7], overrides=["train.max_epochs=3"])
    spec = load_sweep_config(path)
    trials = expand_trials(spec, tmp_path / "sweep")
    assert len(trials) == 2 * 1 * 3 * 2
    assert [t.id for t in trials[:4]] == ["c000-s0", "c000-s7", "c001-s0", "c001-s7"]
    first = trials[0]
    assert first.params == {"loss.weights.dice": 0.5, "model.cbam.sites": ["aspp"], "optim.lr": 1e-4}
    run_dir = tmp_path / "sweep" / "runs" / "c000-s0"
    assert first.overrides == [
        "train.max_epochs=3",
        "loss.weights.dice=0.5",
        "model.cbam.sites=[aspp]",
        "optim.lr=0.0001",
        "train.seed=0",
        f"train.run_dir={run_dir}",
    ]
    assert trials[3].params["optim.lr"] == pytest.approx(3e-5)
    hashes = {}
    for trial in trials:
        hashes.setdefault(trial.config_id, set()).add(trial.config_hash)
    assert all(len(h) == 1 for h in hashes.values())  # seeds share a configuration hash
    assert len({h.pop() for h in hashes.values()}) == 6  # configurations do not
    assert (first.monitor, first.monitor_mode) == ("val/mAP", "max")


def test_nested_grid_cli_overrides_and_relative_base_config(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(DEBUG_YAML.read_text())
    path = tmp_path / "configs" / "spec.yaml"
    path.write_text("base_config: base.yaml\ngrid:\n  loss:\n    weights:\n      bce: [0.25, 0.5]\n")
    spec = load_sweep_config(path, ["grid.optim.lr=[1e-3]", "seeds=[1,2,3]", "executor.trials_per_gpu=2"])
    assert spec.base_config == str((tmp_path / "configs" / "base.yaml").resolve())
    assert spec.grid == {"loss.weights.bce": [0.25, 0.5], "optim.lr": [1e-3]}
    assert spec.name == "spec" and spec.seeds == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="base_config nowhere.yaml not found"):
        load_sweep_config(path, ["base_config=nowhere.yaml"])


def test_random_search_is_seeded_and_within_bounds(tmp_path):
    params = [
        {"key": "optim.lr", "dist": "loguniform", "low": 1e-5, "high": 1e-2},
        {"key": "loss.weights.bce", "dist": "uniform", "low": 0.25, "high": 1.0},
        {"key": "model.backbone", "dist": "choice", "values": ["resnet18", "resnet34"]},
    ]
    spec = load_sweep_config(write_spec(tmp_path, random={"trials": 12, "seed": 3, "params": params}))
    points = sweep_points(spec)
    assert points == sweep_points(load_sweep_config(tmp_path / "spec.yaml"))  # same seed, same draw
    other = load_sweep_config(tmp_path / "spec.yaml", ["random.seed=4"])
    assert sweep_points(other) != points
    values = [{item.partition("=")[0]: parse_overrides([item]) for item in point} for point in points]
    lrs = [v["optim.lr"]["optim"]["lr"] for v in values]
    assert len(points) == 12 and all(1e-5 <= lr <= 1e-2 for lr in lrs)
    assert min(lrs) < 1e-4 < max(lrs)  # log-uniform reaches both decades
    assert {v["model.backbone"]["model"]["backbone"] for v in values} == {"resnet18", "resnet34"}
    assert len(expand_trials(spec, tmp_path / "sweep")) == 12


@pytest.mark.parametrize("value", [0.5, 3e-5, 1e-4, 2, True, None, "unet", ["aspp", "low_level"], [4, 1, 1.5, 2]])
def test_override_round_trips_through_parse_overrides(value):
    text = _override("a.b", value)
    assert parse_overrides([text]) == {"a": {"b": value}}


def test_shipped_sweep_specs_expand(tmp_path):
    loss = load_sweep_config(REPO / "configs" / "sweep_loss_weights.yaml")
    trials = expand_trials(loss, tmp_path / "a")
    assert len(trials) == 9 * 3 and loss.seeds == [0, 1, 2]
    paper = trials[0].params
    assert paper == {
        "loss.weights.dice": 1.0,
        "loss.weights.bce": 0.5,
        "loss.weights.focal": 1.0,
        "loss.weights.boundary": 0.5,
    }
    assert Path(loss.base_config).name == "attention_deeplab.yaml"
    table1 = load_sweep_config(REPO / "configs" / "sweep_table1.yaml")
    trials = expand_trials(table1, tmp_path / "b")
    assert len(trials) == 3 * 5
    assert {t.params["model.name"] for t in trials} == {"attention_deeplab", "deeplabv3plus", "unet"}
