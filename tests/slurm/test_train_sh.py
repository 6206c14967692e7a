"""slurm/train.sh on a real local SLURM cluster (tests/slurm/conftest.py): CPU training, two nodes, preemption."""

from __future__ import annotations

import re
import sys
import time
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

from hpc_drseg.train.checkpoint import checkpoint_path, load_checkpoint

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "slurm" / "train.sh"
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"
NO_GPU = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the script's default asks for a GPU; this cluster has none
JOB_TIMEOUT_S = 300


def tiny_overrides(shards: Path, steps_per_epoch: int = 1, epochs: int = 1) -> list[str]:
    return [f"data.shards={shards}", f"train.steps_per_epoch={steps_per_epoch}", f"train.max_epochs={epochs}",
            "eval.histogram_bins=1000"]  # fmt: skip


def job_env(**extra: str) -> dict[str, str]:
    """The job activates the environment running these tests."""
    return {"DRSEG_VENV": sys.prefix, **extra}


def job_log(folder: Path) -> str:
    """The job's output file (logs/%x-%j.out), progress-bar carriage returns turned into lines."""
    logs = sorted((folder / "logs").glob("drseg-*.out"))
    assert len(logs) == 1, logs
    return logs[0].read_text(errors="replace").replace("\r", "\n")


def finished(cluster, job: int, folder: Path, want: str = "COMPLETED") -> str:
    state = cluster.wait_state(job, timeout_s=JOB_TIMEOUT_S)
    log = job_log(folder) if (folder / "logs").is_dir() else "(no log)"
    assert state == want, f"job {job} ended {state}; its log:\n{log[-6000:]}"
    return log


def test_cluster_runs_and_accounts_a_job_on_every_node(slurm_cluster, tmp_path: Path) -> None:
    nodes = len(slurm_cluster.nodes)
    job = slurm_cluster.sbatch([f"--nodes={nodes}", "--ntasks-per-node=1", "-o", "out-%j.txt",
                                "--wrap", "srun bash -c 'echo node=$SLURMD_NODENAME id=$SLURM_NODEID'"], cwd=tmp_path)
    assert slurm_cluster.wait_state(job, timeout_s=60) == "COMPLETED"
    lines = sorted((tmp_path / f"out-{job}.txt").read_text().split("\n"))
    assert [line for line in lines if line] == [f"node={n} id={i}" for i, n in enumerate(slurm_cluster.nodes)]


# sbatch options → what each task would launch (DRSEG_DRY_RUN=1 prints it): one process per allocated GPU,
# DRSEG_CPU_PROCS without GPUs, srun with one task per node, each expanding its own machine rank.
LAUNCH_CASES = {
    "two_gpus": (["--gpus-per-node=2"], {}, ["accelerate launch * --multi_gpu --num_machines 1 --num_processes 2 "
                                            "--main_process_port {port} -m hpc_drseg train *"]),
    "one_gpu": (["--gpus-per-node=1"], {}, ["python -m hpc_drseg train *"]),
    "cpu_procs": (["--gpus-per-node=0"], {"DRSEG_CPU_PROCS": "2"}, ["accelerate launch * --num_processes 2 *"]),
    "two_nodes": (["--nodes=2", "--gpus-per-node=2"], {}, [
        f"accelerate launch * --num_machines 2 --num_processes 4 --main_process_ip 127.0.0.1 --main_process_port "
        f"{{port}} --machine_rank {rank} -m hpc_drseg train *" for rank in (0, 1)]),
}


def test_launch_command_follows_the_allocation(slurm_cluster, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    jobs = {}
    for name, (options, env, _) in LAUNCH_CASES.items():
        jobs[name] = slurm_cluster.sbatch([*options, "--cpus-per-task=1", f"--job-name={name}", str(TRAIN_SH),
                                           str(DEBUG_CONFIG), "train.batch_size=1"],
                                          cwd=tmp_path, env=job_env(DRSEG_DRY_RUN="1", **env))  # fmt: skip
    for name, (_, _, patterns) in LAUNCH_CASES.items():
        assert slurm_cluster.wait_state(jobs[name], timeout_s=60) == "COMPLETED", name
        printed = [line for line in (tmp_path / "logs" / f"{name}-{jobs[name]}.out").read_text().splitlines()
                   if not line.startswith("[train.sh")]  # fmt: skip
        port = 20000 + jobs[name] % 20000  # a port per job: two jobs on one node don't collide
        wanted = [p.format(port=port) for p in patterns]
        assert len(printed) == len(wanted) and all(fnmatchcase(line, p) for line, p in zip(sorted(printed), wanted)), (
            name, printed)


@pytest.fixture(scope="module")
def submitted(slurm_cluster, shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, Path]]:
    """Submits the one-node array task and the two-node job together (they fit side by side): name → (job, folder)."""
    single, double = tmp_path_factory.mktemp("array_job"), tmp_path_factory.mktemp("two_node_job")
    (single / "logs").mkdir()
    array_job = slurm_cluster.sbatch([*NO_GPU, "--array=3", str(TRAIN_SH), str(DEBUG_CONFIG),
                                      *tiny_overrides(shards_dir)], cwd=single, env=job_env())  # fmt: skip
    jobs = {"array": (array_job, single)}
    if len(slurm_cluster.nodes) >= 2:
        # Run directly, the script creates logs/ and submits itself with the leading sbatch options.
        out = slurm_cluster.run(["bash", str(TRAIN_SH), "--parsable", "--nodes=2", *NO_GPU, str(DEBUG_CONFIG),
                                 *tiny_overrides(shards_dir)], cwd=double, env=job_env()).stdout  # fmt: skip
        jobs["two_node"] = (int(out.strip()), double)
    return jobs


@pytest.mark.slow
def test_array_task_trains_its_seed_evaluates_and_reports(slurm_cluster, submitted) -> None:
    job, folder = submitted["array"]
    log = finished(slurm_cluster, job, folder)
    run = folder / "runs" / "debug-seed3"  # runs/<config stem>-seed<task id>
    assert "launch: python -m hpc_drseg train" in log  # no GPU, one CPU process: no launcher
    assert (run / "report.md").is_file() and (run / "eval_test.json").is_file(), sorted(p.name for p in run.iterdir())
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 3
    assert load_checkpoint(checkpoint_path(run))["progress"]["global_step"] == 1


@pytest.mark.slow
def test_two_node_job_trains_one_rank_per_node(slurm_cluster, submitted) -> None:
    if "two_node" not in submitted:
        pytest.skip("the local cluster has one node")
    job, folder = submitted["two_node"]
    log = finished(slurm_cluster, job, folder)
    assert "launch: srun --ntasks-per-node=1" in log and "--num_machines 2 --num_processes 2" in log
    assert "replicas identical on all 2 ranks" in log
    run = folder / "runs" / "debug"
    assert (run / "report.md").is_file() and (run / "eval_test.json").is_file()


def wait_for_training_step(folder: Path, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Until rank 0's progress bar shows a finished step of epoch 0 (the trainer's signal handler is then set)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = list((folder / "logs").glob("drseg-*.out"))
        if logs and re.search(r"^epoch 0: .*\|\s*[1-9]\d*/\d+ ", job_log(folder), re.MULTILINE):
            return
        time.sleep(0.3)
    raise TimeoutError(f"no training step logged in {folder / 'logs'} after {timeout_s} s")


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, shards_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    overrides = [*tiny_overrides(shards_dir, steps_per_epoch=3), "train.run_dir=runs/preempted"]
    job = slurm_cluster.sbatch(["--gpus-per-node=0", "--cpus-per-task=2", str(TRAIN_SH), str(DEBUG_CONFIG),
                                *overrides], cwd=tmp_path, env=job_env(DRSEG_CPU_PROCS="2"))  # fmt: skip
    wait_for_training_step(tmp_path)
    # What --signal=B:USR2@90 does before the time limit: only the batch shell gets it, and forwards it.
    slurm_cluster.run(["scancel", "--signal=USR2", "--batch", str(job)])
    log = finished(slurm_cluster, job, tmp_path)

    total = 3
    stopped = re.search(r"stopped by SIGTERM \(epoch (\d+), step (\d+)\)", log)
    resumed = re.search(r"resumed \S+last\.pt at epoch (\d+), step (\d+)", log)
    assert stopped and resumed, log[-6000:]
    assert "--multi_gpu --num_machines 1 --num_processes 2" in log
    assert "requeueing job" in log and "(restart 1)" in log
    # The requeued run starts at the step the stopped one checkpointed, and no step runs twice.
    assert resumed.groups() == stopped.groups() and 0 < int(stopped.group(2)) <= total
    run = tmp_path / "runs" / "preempted"
    assert load_checkpoint(checkpoint_path(run))["progress"]["global_step"] == total
    assert f"finished 1 epochs (epoch 1, step {total})" in log
    history = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[:2] for row in history[1:]] == [["0", "3"]]  # one validation, no repeat
    assert (run / "report.md").is_file() and (run / "eval_test.json").is_file()
    states = slurm_cluster.run(["sacct", "--duplicates", "-X", "-n", "-P", "-j", str(job), "-o", "State"]).stdout
    assert states.split() == ["REQUEUED", "COMPLETED"]
