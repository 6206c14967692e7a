"""slurm/train.sh on a real local SLURM cluster (tests/slurm/conftest.py): CPU training, multi-process, requeue."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def test_cluster_runs_and_accounts_a_job_on_every_node(slurm_cluster, tmp_path: Path) -> None:
    nodes = len(slurm_cluster.nodes)
    job = slurm_cluster.sbatch([f"--nodes={nodes}", "--ntasks-per-node=1", "-o", "out-%j.txt",
                                "--wrap", "srun bash -c 'echo node=$SLURMD_NODENAME id=$SLURM_NODEID'"], cwd=tmp_path)
    assert slurm_cluster.wait_state(job, timeout_s=60) == "COMPLETED"
    lines = sorted((tmp_path / f"out-{job}.txt").read_text().split("\n"))
    assert [line for line in lines if line] == [f"node={n} id={i}" for i, n in enumerate(slurm_cluster.nodes)]
