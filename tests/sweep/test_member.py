"""The job-array member: checkpoint() resubmits a picklable copy of itself."""

from __future__ import annotations

import pickle

import yaml

from hpc_drseg.sweep.member import SweepMember


def test_member_checkpoint_resubmits_itself_without_live_processes(tmp_path):
    member = SweepMember(tmp_path / "sweep")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.yaml").write_text(
        yaml.safe_dump({"grid": {"optim.lr": [1e-4]}, "executor": {"signal_delay_s": 40}})
    )
    delayed = member.checkpoint(["c000-s0", "c000-s1"])
    assert delayed.args == (["c000-s0", "c000-s1"],)
    assert isinstance(delayed.function, SweepMember) and delayed.function.sweep_dir == member.sweep_dir
    assert pickle.loads(pickle.dumps(delayed.function)).sweep_dir == member.sweep_dir
