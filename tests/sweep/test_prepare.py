"""Preparing a sweep folder: sweep.yaml and trials.json written once; --resume picks the trials to rerun."""

from __future__ import annotations

import pytest
from sweep_testkit import write_spec

from hpc_drseg.config import load_sweep_config
from hpc_drseg.sweep.prepare import prepare_sweep
from hpc_drseg.sweep.status import sweep_status
from hpc_drseg.sweep.store import load_trials


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
