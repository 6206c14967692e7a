"""Sweeps without SLURM: spec validation, grid × seeds expansion, random search, status, summary, real local runs."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hpc_drseg.cli import main
from hpc_drseg.config import ConfigError, load_sweep_config, parse_overrides
from hpc_drseg.sweep import (
    SweepMember,
    _override,
    _trial_state,
    collect_sweep,
    expand_trials,
    load_trials,
    member_groups,
    prepare_sweep,
    read_trial_state,
    run_sweep,
    sweep_points,
    sweep_status,
)

REPO = Path(__file__).resolve().parents[1]
DEBUG_YAML = REPO / "configs" / "debug.yaml"
# A U-Net of width 8 for one step: each trial is dominated by process start-up (~10 s train + ~8 s eval on 2 cores).
TINY = ["model.name=unet", "model.unet_base_width=8", "train.steps_per_epoch=1", "train.max_epochs=1",
        "eval.histogram_bins=1000"]  # fmt: skip


def write_spec(folder: Path, **fields) -> Path:
    spec = {"base_config": str(DEBUG_YAML), "sweep_dir": str(folder / "sweep"), "executor": {"kind": "debug"}}
    spec.update(fields)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ spec and expansion
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
        ({"random": {"trials": 2, "params": [{"key": "optim.lr", "dist": "loguniform", "low": 0, "high": 1}]}},
         "'loguniform' needs low > 0"),
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
    assert first.overrides == ["train.max_epochs=3", "loss.weights.dice=0.5", "model.cbam.sites=[aspp]",
                               "optim.lr=0.0001", "train.seed=0", f"train.run_dir={run_dir}"]  # fmt: skip
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
    params = [{"key": "optim.lr", "dist": "loguniform", "low": 1e-5, "high": 1e-2},
              {"key": "loss.weights.bce", "dist": "uniform", "low": 0.25, "high": 1.0},
              {"key": "model.backbone", "dist": "choice", "values": ["resnet18", "resnet34"]}]  # fmt: skip
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


def test_member_groups_pack_trials_per_gpu(tmp_path):
    spec = load_sweep_config(write_spec(tmp_path, grid={"loss.weights.dice": [0.5, 1.0, 2.0]}, seeds=[0, 1]))
    trials = expand_trials(spec, tmp_path / "sweep")
    assert member_groups(trials, spec.executor) == [[t.id] for t in trials]
    spec.executor.trials_per_gpu = 2
    assert member_groups(trials, spec.executor) == [["c000-s0", "c000-s1"], ["c001-s0", "c001-s1"],
                                                    ["c002-s0", "c002-s1"]]  # fmt: skip
    spec.executor.gpus_per_node = 2
    assert [len(g) for g in member_groups(trials, spec.executor)] == [4, 2]


def test_shipped_sweep_specs_expand(tmp_path):
    loss = load_sweep_config(REPO / "configs" / "sweep_loss_weights.yaml")
    trials = expand_trials(loss, tmp_path / "a")
    assert len(trials) == 9 * 3 and loss.seeds == [0, 1, 2]
    paper = trials[0].params
    assert paper == {"loss.weights.dice": 1.0, "loss.weights.bce": 0.5, "loss.weights.focal": 1.0,
                     "loss.weights.boundary": 0.5}  # fmt: skip
    assert Path(loss.base_config).name == "attention_deeplab.yaml"
    table1 = load_sweep_config(REPO / "configs" / "sweep_table1.yaml")
    trials = expand_trials(table1, tmp_path / "b")
    assert len(trials) == 3 * 5
    assert {t.params["model.name"] for t in trials} == {"attention_deeplab", "deeplabv3plus", "unet"}


def test_prepare_writes_the_sweep_dir_and_refuses_to_overwrite(tmp_path):
    spec = load_sweep_config(write_spec(tmp_path, grid={"loss.weights.dice": [0.5, 1.0]}, seeds=[0, 1]))
    sweep_dir, trials = prepare_sweep(spec)
    assert len(trials) == 4 and sweep_dir == (tmp_path / "sweep").resolve()
    saved = load_trials(sweep_dir)
    assert saved["c001-s1"].run_dir == str(sweep_dir / "runs" / "c001-s1")
    assert saved["c001-s1"].overrides == trials[3].overrides
    assert load_sweep_config(sweep_dir / "sweep.yaml").sweep_dir == str(sweep_dir)
    assert {row["state"] for row in sweep_status(sweep_dir)} == {"PENDING"}
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_sweep(load_sweep_config(tmp_path / "spec.yaml"))
    _, todo = prepare_sweep(load_sweep_config(tmp_path / "spec.yaml"), resume=True)
    assert len(todo) == 4  # never submitted: all of them
    with pytest.raises(ValueError, match="other trials"):
        prepare_sweep(load_sweep_config(tmp_path / "spec.yaml", ["seeds=[0]"]), resume=True)


def test_member_checkpoint_resubmits_itself_without_live_processes(tmp_path):
    member = SweepMember(tmp_path / "sweep")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.yaml").write_text(yaml.safe_dump({"grid": {"optim.lr": [1e-4]},
                                                                    "executor": {"signal_delay_s": 40}}))  # fmt: skip
    delayed = member.checkpoint(["c000-s0", "c000-s1"])
    assert delayed.args == (["c000-s0", "c000-s1"],)
    assert isinstance(delayed.function, SweepMember) and delayed.function.sweep_dir == member.sweep_dir
    assert pickle.loads(pickle.dumps(delayed.function)).sweep_dir == member.sweep_dir


# ------------------------------------------------------------------------------------------------------ status
@pytest.mark.parametrize(
    "record, job_state, state",
    [
        ({}, None, "PENDING"),
        ({}, "PENDING", "PENDING"),
        ({"status": "STOPPED"}, "REQUEUED", "PENDING"),  # preempted and requeued
        ({}, "RUNNING", "PENDING"),  # its member runs, the trial has not started yet
        ({"status": "RUNNING", "phase": "train"}, "RUNNING", "RUNNING"),
        ({"status": "COMPLETED", "metrics": {"val/mAP": 0.5}}, "COMPLETED", "COMPLETED"),
        ({"status": "FAILED", "error": "train exited with 1"}, "FAILED", "FAILED"),
        ({"status": "RUNNING", "phase": "train"}, "FAILED", "FAILED"),  # the member crashed under the trial
        ({"status": "RUNNING", "phase": "eval"}, "CANCELLED", "FAILED"),
        ({}, "OUT_OF_MEMORY", "FAILED"),
        ({}, "GONE", "FAILED"),
        ({"status": "STOPPED"}, None, "FAILED"),  # debug executor: nothing will requeue it
    ],
)
def test_trial_state_from_record_and_job(record, job_state, state):
    assert _trial_state(record, job_state, "val/mAP")[0] == state


def test_status_reports_a_dead_member_process_failed(tmp_path):
    spec = load_sweep_config(write_spec(tmp_path, grid={"loss.weights.dice": [0.5]}, seeds=[0, 1]))
    sweep_dir, _ = prepare_sweep(spec)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state_dir = sweep_dir / "state"
    state_dir.mkdir()
    host = os.uname().nodename
    for trial_id, pid in (("c000-s0", dead.pid), ("c000-s1", os.getpid())):
        record = {"status": "RUNNING", "phase": "train", "host": host, "pid": pid}
        (state_dir / f"{trial_id}.json").write_text(json.dumps(record))
    started = time.perf_counter()
    rows = {row["trial"]: row for row in sweep_status(sweep_dir)}
    assert time.perf_counter() - started < 5
    assert rows["c000-s0"]["state"] == "FAILED" and str(dead.pid) in rows["c000-s0"]["detail"]
    assert rows["c000-s1"]["state"] == "RUNNING"


# ----------------------------------------------------------------------------------------------------- collect
def _fake_run(run_dir: Path, val_maps: list[float], test_map: float) -> None:
    """A run directory as drseg train + drseg eval leave it (metrics.csv, eval_test.json), with chosen numbers."""
    run_dir.mkdir(parents=True)
    lines = ["epoch,step,val/loss,val/mAP,val/mIoU,val/mDice"]
    lines += [f"{e},{e + 1},1.0,{m},{m / 2},{m / 3}" for e, m in enumerate(val_maps)]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    protocols = {"paper": {"mAP": test_map, "mIoU": 0.1}, "standard": {"mAP": test_map - 0.05, "mIoU": None}}
    (run_dir / "eval_test.json").write_text(json.dumps({"split": "test", "protocols": protocols}))


def test_collect_means_stds_ranking_and_plots(tmp_path):
    spec = load_sweep_config(write_spec(tmp_path, grid={"loss.weights.dice": [0.5, 1.0, 2.0]}, seeds=[0, 1]))
    sweep_dir, trials = prepare_sweep(spec)
    numbers = {"c000-s0": ([0.1, 0.2], 0.3), "c000-s1": ([0.4, 0.3], 0.5),  # best epochs: 0.2 and 0.4
               "c001-s0": ([0.6], 0.7), "c001-s1": ([0.5, 0.8], 0.9)}  # fmt: skip
    (sweep_dir / "state").mkdir()
    for trial in trials:
        if trial.id in numbers:
            _fake_run(Path(trial.run_dir), *numbers[trial.id])
            record = {"status": "COMPLETED"}
        else:
            record = {"status": "FAILED", "error": "train exited with 1"}
        (sweep_dir / "state" / f"{trial.id}.json").write_text(json.dumps(record))
    paths = collect_sweep(sweep_dir)
    md = paths["md"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 3
    assert rows[0].startswith("| 1 | c001 | 1 | 2 | 0 | 0.7000 ± 0.1414 |")  # val/mAP 0.6, 0.8
    assert rows[1].startswith("| 2 | c000 | 0.5 | 2 | 0 | 0.3000 ± 0.1414 |")  # best epochs 0.2, 0.4
    assert rows[2].startswith("| 3 | c002 | 2 | 0 | 2 | n/a |")
    assert "0.8000 ± 0.1414" in rows[0]  # test/paper/mAP 0.7, 0.9
    csv_rows = paths["csv"].read_text().splitlines()
    assert csv_rows[0].startswith("rank,config,loss.weights.dice,n_seeds,n_failed,n_pending,config_hash,val/mAP_mean")
    assert csv_rows[1].split(",")[7:9] == ["0.7", "0.141421"]
    assert paths["plot:loss.weights.dice"].name == "val_mAP_vs_loss.weights.dice.png"
    assert paths["plot:loss.weights.dice"].stat().st_size > 1000
    ranked = collect_sweep(sweep_dir, rank_by="test/standard/mAP")["md"].read_text()
    assert "Ranked by **test/standard/mAP**" in ranked
    with pytest.raises(ValueError, match="choose one of"):
        collect_sweep(sweep_dir, rank_by="val/accuracy")


# ------------------------------------------------------------------------------------------ real sweeps, no SLURM
@pytest.fixture(scope="module")
def debug_sweep(shards_dir, tmp_path_factory):
    """2 loss weights × 2 seeds that train and evaluate for real, plus one configuration whose trainer fails."""
    folder = tmp_path_factory.mktemp("debug_sweep")
    path = write_spec(folder, overrides=[f"data.shards={shards_dir}", *TINY], seeds=[0, 1],
                      grid={"loss.weights.dice": [0.5, 2.0]}, points=[["data.image_px=256"]],
                      executor={"kind": "debug", "trials_per_gpu": 2})  # fmt: skip
    started = time.perf_counter()
    result = run_sweep(path)
    result["test_wall_s"] = time.perf_counter() - started
    return result


@pytest.mark.slow
def test_debug_sweep_end_to_end(debug_sweep):
    sweep_dir = Path(debug_sweep["sweep_dir"])
    assert debug_sweep["submitted"] == 6 and len(debug_sweep["members"]) == 3  # two trials packed per member
    rows = {row["trial"]: row for row in sweep_status(sweep_dir)}
    assert {t: r["state"] for t, r in rows.items()} == {
        "c000-s0": "COMPLETED", "c000-s1": "COMPLETED", "c001-s0": "COMPLETED", "c001-s1": "COMPLETED",
        "c002-s0": "FAILED", "c002-s1": "FAILED",
    }  # fmt: skip
    assert "data.image_px=256" in rows["c002-s0"]["detail"]  # the trainer's own error message
    for trial_id in ("c000-s0", "c001-s1"):
        run_dir = sweep_dir / "runs" / trial_id
        assert (run_dir / "eval_test.json").is_file() and (run_dir / "metrics.csv").is_file()
        assert read_trial_state(sweep_dir, trial_id)["metrics"]["test/paper/mAP"] >= 0
    config = yaml.safe_load((sweep_dir / "runs" / "c001-s1" / "config.yaml").read_text())
    assert config["loss"]["weights"]["dice"] == 2.0 and config["train"]["seed"] == 1
    md = (sweep_dir / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 3
    assert sum(" ± " in row and "| 2 | 0 |" in row for row in rows) == 2  # two configurations: mean ± std of 2 seeds
    assert any("| 256 | 0 | 2 | n/a |" in row for row in rows)  # the failing configuration, counted
    assert (sweep_dir / "plots" / "val_mAP_vs_loss.weights.dice.png").is_file()
    print(f"debug sweep of 6 trials: {debug_sweep['test_wall_s']:.1f} s")


@pytest.mark.slow
def test_cli_status_and_collect(debug_sweep, capsys):
    sweep_dir = debug_sweep["sweep_dir"]
    assert main(["sweep", "status", sweep_dir]) == 0
    out = capsys.readouterr().out
    assert "6 trials: 4 COMPLETED, 2 FAILED" in out and "c002-s1  FAILED" in out
    assert main(["sweep", "collect", sweep_dir, "--rank-by", "test/standard/mIoU"]) == 0
    assert "Ranked by **test/standard/mIoU**" in capsys.readouterr().out
    assert main(["sweep", "status"]) == 2
    assert "usage: drseg sweep status SWEEP_DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_reruns_only_failed_trials(debug_sweep, shards_dir):
    sweep_dir = Path(debug_sweep["sweep_dir"])
    spec = load_sweep_config(sweep_dir.parent / "spec.yaml")
    _, todo = prepare_sweep(spec, resume=True)
    assert [t.id for t in todo] == ["c002-s0", "c002-s1"]
    assert read_trial_state(sweep_dir, "c002-s0")["status"] == "PENDING"


def test_cli_run_needs_config(capsys):
    assert main(["sweep", "run"]) == 2
    assert "needs --config" in capsys.readouterr().err


def test_local_executor_runs_members_as_submitit_jobs(shards_dir, tmp_path, capsys):
    """The local executor: members are submitit jobs (pickled callable, own process, result pickle). This trial's
    trainer fails fast, so the member's job ends in error and status reads FAILED from its result pickle.
    (Preemption → checkpoint → requeue → resume is tested on a real cluster in tests/slurm/test_sweep_slurm.py.)"""
    path = write_spec(tmp_path, overrides=[f"data.shards={shards_dir}", *TINY], points=[["data.image_px=256"]],
                      executor={"kind": "debug", "timeout_min": 5})  # fmt: skip
    assert main(["sweep", "--config", str(path), "--executor", "local", "name=local_test"]) == 0
    sweep_dir = tmp_path / "sweep"
    assert f"{sweep_dir}: 1 trials, 1 submitted as 1 local member(s)" in capsys.readouterr().out
    (member,) = json.loads((sweep_dir / "jobs.json").read_text())["submissions"][0]["members"]
    assert load_sweep_config(sweep_dir / "sweep.yaml").name == "local_test"
    assert (sweep_dir / "submitit" / member["job"] / f"{member['job']}_0_result.pkl").is_file()
    (row,) = sweep_status(sweep_dir)
    assert (row["state"], row["job_state"]) == ("FAILED", "FAILED")
    assert "data.image_px=256" in row["detail"]
    record = read_trial_state(sweep_dir, "c000-s0")
    assert record["job"] == member["job"] and record["pid"] != os.getpid()  # ran in the member's own process
