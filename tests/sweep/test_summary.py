"""`drseg sweep collect`: mean ± std over seeds per configuration, ranking, summary.md/.csv and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sweep_testkit import write_spec

from hpc_drseg.config import load_sweep_config
from hpc_drseg.sweep.prepare import prepare_sweep
from hpc_drseg.sweep.summary import collect_sweep


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
    numbers = {
        "c000-s0": ([0.1, 0.2], 0.3),
        "c000-s1": ([0.4, 0.3], 0.5),  # best epochs: 0.2 and 0.4
        "c001-s0": ([0.6], 0.7),
        "c001-s1": ([0.5, 0.8], 0.9),
    }
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


def test_concurrent_collects_of_one_sweep_all_succeed(tmp_path):
    """Users and scripts run `drseg sweep collect` on one folder at once: every file is written under a name of its
    own and renamed, so none fails on another's temporary file and the results are complete."""
    import subprocess
    import sys

    spec = load_sweep_config(write_spec(tmp_path, grid={"loss.weights.dice": [0.5, 1.0]}, seeds=[0, 1]))
    sweep_dir, trials = prepare_sweep(spec)
    (sweep_dir / "state").mkdir()
    for index, trial in enumerate(trials):
        _fake_run(Path(trial.run_dir), [0.1 * (index + 1)], 0.5)
        (sweep_dir / "state" / f"{trial.id}.json").write_text(json.dumps({"status": "COMPLETED"}))
    collect = [sys.executable, "-m", "hpc_drseg", "sweep", "collect", str(sweep_dir)]
    procs = [subprocess.Popen(collect, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outcomes = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]
    assert [code for code, _ in outcomes] == [0] * 6, outcomes
    assert not [p.name for p in sweep_dir.rglob("*") if p.name.endswith(".tmp")]
    assert (sweep_dir / "plots" / "val_mAP_vs_loss.weights.dice.png").stat().st_size > 1000
    assert len(collect_sweep(sweep_dir)["md"].read_text().splitlines()) > 5
