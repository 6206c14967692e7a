"""Session fixtures: real throw-away SLURM clusters (slurm/local/start.sh), each stopped after the session.

`slurm_cluster`: two slurmd "nodes" on this host with 2 fake GPUs each (gres; CUDA stays absent, so training runs on
CPU), accounting through slurmdbd (so `sacct` and submitit see job states). `defaults_cluster` and
`gpu_less_cluster`: one node each offering slurm/train.sh's default 8 CPUs (more than this host may have), with one
fake GPU and without any GPU (no gpu GRES at all, as on a CPU-only cluster); each is started the first time a test
asks for it, beside the others. Tests using them are marked `slurm`; they skip only where start.sh says SLURM can't
be started here (exit 77: not root, no packages).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
START_SH = REPO / "slurm" / "local" / "start.sh"
STOP_SH = REPO / "slurm" / "local" / "stop.sh"
CANNOT_START = 77  # start.sh's exit status for "not root / packages can't be installed"
CLUSTER_NODES = 2
FAKE_GPUS_PER_NODE = 2  # gres/gpu entries backed by /dev/null-like files: jobs can ask for GPUs, CUDA stays absent
SCRIPT_CPUS = 8  # slurm/train.sh's #SBATCH --cpus-per-task: a node must offer as many for its defaults to fit
START_TIMEOUT_S = 900  # installing the Debian packages on a fresh machine takes ~1 min, more on a slow mirror
# Job states after which a job never runs again (sacct's words; REQUEUED/PENDING/RUNNING are not among them).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


@dataclass(frozen=True)
class SlurmCluster:
    """A running local cluster; `env` is what SLURM clients (sbatch, sacct, submitit) need."""

    state_dir: Path
    slurm_conf: Path
    nodes: tuple[str, ...]
    start_s: float

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    def run(
        self,
        args: Sequence[str],
        cwd: Optional[Path] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout_s: float = 30,
    ) -> subprocess.CompletedProcess:
        """Runs a SLURM client command against this cluster; raises with its output when it fails."""
        result = subprocess.run(
            list(args), cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout_s
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def sbatch(self, args: Sequence[str], cwd: Path, env: Optional[Mapping[str, str]] = None) -> int:
        """Submits `sbatch --parsable ARGS` from `cwd`; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0])

    def job_state(self, job_id: int | str) -> str:
        """sacct's state of the job's latest run, first word only ("CANCELLED by 0" → "CANCELLED"); "" if unknown."""
        lines = self.run(["sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "State"]).stdout.split("\n")
        lines = [line for line in lines if line.strip()]
        return lines[-1].split()[0] if lines else ""

    def wait_state(self, job_id: int | str, states: frozenset[str] = FINAL_STATES, timeout_s: float = 120) -> str:
        """Polls sacct until the job reaches one of `states`; returns it. TimeoutError names the last state seen."""
        deadline, state = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout_s:.0f} s (wanted {sorted(states)})")


def _start(state_dir: Path, nodes: int, fake_gpus: int, node_cpus: Optional[int] = None) -> SlurmCluster:
    t0 = time.monotonic()
    env = {**os.environ, "DRSEG_SLURM_NODES": str(nodes), "DRSEG_FAKE_GPUS": str(fake_gpus)}
    if node_cpus is not None:
        env["DRSEG_NODE_CPUS"] = str(node_cpus)
    try:
        result = subprocess.run(
            ["bash", str(START_SH), str(state_dir)], env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        _stop(state_dir)
        pytest.fail(f"slurm/local/start.sh did not finish in {START_TIMEOUT_S} s", pytrace=False)
    if result.returncode == CANNOT_START:
        pytest.skip(f"local SLURM cluster unavailable: {result.stderr.strip().splitlines()[-1]}")
    if result.returncode != 0:
        pytest.fail(f"slurm/local/start.sh failed ({result.returncode}):\n{result.stderr[-4000:]}", pytrace=False)
    slurm_conf = state_dir / "etc" / "slurm.conf"
    assert f"export SLURM_CONF={slurm_conf}" in result.stdout, result.stdout
    sinfo = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N"],
        env={**os.environ, "SLURM_CONF": str(slurm_conf)},
        capture_output=True,
        text=True,
        check=True,
    )
    nodes = sinfo.stdout.split()
    return SlurmCluster(state_dir, slurm_conf, tuple(sorted(set(nodes))), time.monotonic() - t0)


def _stop(state_dir: Path) -> None:
    subprocess.run(["bash", str(STOP_SH), str(state_dir)], capture_output=True, timeout=120)


def _cluster(tmp_path_factory: pytest.TempPathFactory, name: str, **layout: int) -> Iterator[SlurmCluster]:
    """A cluster with its state under pytest's tmp; every daemon stopped afterwards (also when the start failed)."""
    state_dir = tmp_path_factory.mktemp(name)
    try:
        yield _start(state_dir, **layout)
    finally:
        _stop(state_dir)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Two nodes with two fake GPUs each, started once per session."""
    yield from _cluster(tmp_path_factory, "slurm", nodes=CLUSTER_NODES, fake_gpus=FAKE_GPUS_PER_NODE)


@pytest.fixture(scope="session")
def defaults_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One node offering what slurm/train.sh asks for by default (1 GPU, 8 CPUs): `sbatch slurm/train.sh …` as is."""
    yield from _cluster(tmp_path_factory, "slurm-defaults", nodes=1, fake_gpus=1, node_cpus=SCRIPT_CPUS)


@pytest.fixture(scope="session")
def gpu_less_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One node with 8 CPUs and no GPU: sbatch rejects any GPU request there ("Invalid generic resource")."""
    yield from _cluster(tmp_path_factory, "slurm-gpu-less", nodes=1, fake_gpus=0, node_cpus=SCRIPT_CPUS)


@pytest.fixture
def slurm_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """`slurm_cluster` with SLURM_CONF set in os.environ for this test (for in-process clients such as submitit)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.slurm_conf))
    return slurm_cluster
