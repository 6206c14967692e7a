"""slurm/train.sh on real local SLURM clusters (tests/slurm/conftest.py): launch choice, CPU training, preemption, the
README's command from a fresh clone, clusters without GPUs, bad overrides, and the requeue rules (cancel, progress,
cap, time limit).

The three training jobs of `jobs` are submitted together (they fit side by side on the two 2-CPU nodes) and checked
one by one.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

from hpc_drseg.train.checkpoint import checkpoint_path, load_checkpoint

pytestmark = pytest.mark.slurm

# Job states after which a job never runs again (as tests/slurm/conftest.py FINAL_STATES).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE"})

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "slurm" / "train.sh"
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"
NO_GPU = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the script's default asks for a GPU and 8 CPUs
JOB_TIMEOUT_S = 400
PREEMPTED_STEPS = 3  # one epoch; the stop signal comes after step 1, so the requeued job resumes mid-epoch


def tiny_overrides(shards: Path, steps_per_epoch: int = 1) -> list[str]:
    return [
        f"data.shards={shards}",
        f"train.steps_per_epoch={steps_per_epoch}",
        "train.max_epochs=1",
        "eval.score_bits=8",
    ]


def job_env(**extra: str) -> dict[str, str]:
    """The job activates the environment running these tests."""
    return {"DRSEG_VENV": sys.prefix, **extra}


def train_sh_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[train.sh ")]


def job_log(folder: Path) -> str:
    """The job's output file (logs/%x-%j.out), progress-bar carriage returns turned into line breaks."""
    logs = sorted((folder / "logs").glob("drseg-*.out"))
    assert len(logs) <= 1, logs
    return logs[0].read_text(errors="replace").replace("\r", "\n") if logs else ""


def finished(cluster, job: int, folder: Path, want: str = "COMPLETED") -> str:
    state = cluster.wait_state(job, timeout_s=JOB_TIMEOUT_S)
    log = job_log(folder)
    assert state == want, f"job {job} ended {state}; its log:\n{log[-6000:]}"
    return log


def test_cluster_runs_and_accounts_a_job_on_every_node(slurm_cluster, tmp_path: Path) -> None:
    nodes = len(slurm_cluster.nodes)
    job = slurm_cluster.sbatch(
        [
            f"--nodes={nodes}",
            "--ntasks-per-node=1",
            "-o",
            "out-%j.txt",
            "--wrap",
            "srun bash -c 'echo node=$SLURMD_NODENAME id=$SLURM_NODEID'",
        ],
        cwd=tmp_path,
    )
    assert slurm_cluster.wait_state(job, timeout_s=60) == "COMPLETED"
    lines = sorted((tmp_path / f"out-{job}.txt").read_text().split("\n"))
    assert [line for line in lines if line] == [f"node={n} id={i}" for i, n in enumerate(slurm_cluster.nodes)]


# sbatch options → what each task would launch (DRSEG_DRY_RUN=1 prints it): one process per allocated GPU,
# DRSEG_CPU_PROCS without GPUs, srun with one task per node, each expanding its own machine rank.
LAUNCH_CASES = {
    "two_gpus": (
        ["--gpus-per-node=2"],
        {},
        [
            "accelerate launch * --multi_gpu --num_machines 1 --num_processes 2 "
            "--main_process_port {port} -m hpc_drseg train *"
        ],
    ),
    "one_gpu": (["--gpus-per-node=1"], {}, ["python -m hpc_drseg train *"]),
    "cpu_procs": (["--gpus-per-node=0"], {"DRSEG_CPU_PROCS": "2"}, ["accelerate launch * --num_processes 2 *"]),
    "two_nodes": (
        ["--nodes=2", "--gpus-per-node=2"],
        {},
        [
            f"accelerate launch * --num_machines 2 --num_processes 4 --main_process_ip 127.0.0.1 --main_process_port "
            f"{{port}} --machine_rank {rank} -m hpc_drseg train *"
            for rank in (0, 1)
        ],
    ),
}


def test_launch_command_follows_the_allocation(slurm_cluster, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    jobs = {}
    for name, (options, env, _) in LAUNCH_CASES.items():
        args = [*options, "--cpus-per-task=1", f"--job-name={name}", str(TRAIN_SH), str(DEBUG_CONFIG)]
        jobs[name] = slurm_cluster.sbatch(
            [*args, "train.batch_size=1"], cwd=tmp_path, env=job_env(DRSEG_DRY_RUN="1", **env)
        )
    for name, (_, _, patterns) in LAUNCH_CASES.items():
        assert slurm_cluster.wait_state(jobs[name], timeout_s=60) == "COMPLETED", name
        lines = (tmp_path / "logs" / f"{name}-{jobs[name]}.out").read_text().splitlines()
        printed = [line for line in lines if not line.startswith("[train.sh")]
        port = 20000 + jobs[name] % 20000  # a port per job: two jobs on one node don't collide
        wanted = [p.format(port=port) for p in patterns]
        matched = all(fnmatchcase(line, p) for line, p in zip(sorted(printed), wanted))
        assert len(printed) == len(wanted) and matched, (name, printed)


def step_logged(folder: Path) -> bool:
    """Rank 0's progress bar shows a finished step of epoch 0: the trainer's signal handler is installed."""
    return re.search(r"^epoch 0: .*\|\s*[1-9]\d*/\d+ ", job_log(folder), re.MULTILINE) is not None


def interrupt_after_first_step(cluster, jobs: dict[str, tuple[int, Path]]) -> None:
    """Sends each job what --signal=B:USR2@90 sends before the time limit: USR2 to the batch shell only."""
    waiting, deadline = dict(jobs), time.monotonic() + JOB_TIMEOUT_S
    while waiting and time.monotonic() < deadline:
        for name, (job, folder) in list(waiting.items()):
            if step_logged(folder):
                cluster.run(["scancel", "--signal=USR2", "--batch", str(job)])
                del waiting[name]
        time.sleep(0.3)
    assert not waiting, f"no training step logged by {sorted(waiting)} within {JOB_TIMEOUT_S} s"


@pytest.fixture(scope="module")
def jobs(slurm_cluster, shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, Path]]:
    """name → (job id, submit folder): an array task, and a one-node and a two-node job that get preempted."""
    if len(slurm_cluster.nodes) < 2:
        pytest.fail("the test cluster should have two nodes (tests/slurm/conftest.py CLUSTER_NODES)")
    folders = {name: tmp_path_factory.mktemp(name) for name in ("array", "one_node", "two_nodes")}
    preempted = [*tiny_overrides(shards_dir, PREEMPTED_STEPS), "train.run_dir=runs/preempted"]
    submitted = {}
    (folders["array"] / "logs").mkdir()
    submitted["array"] = slurm_cluster.sbatch(
        [*NO_GPU, "--array=3", str(TRAIN_SH), str(DEBUG_CONFIG), *tiny_overrides(shards_dir)],
        cwd=folders["array"],
        env=job_env(),
    )
    (folders["one_node"] / "logs").mkdir()
    submitted["one_node"] = slurm_cluster.sbatch(
        [*NO_GPU, str(TRAIN_SH), str(DEBUG_CONFIG), *preempted],
        cwd=folders["one_node"],
        env=job_env(DRSEG_CPU_PROCS="2"),
    )
    # Run directly, the script creates logs/ and submits itself with the leading sbatch options.
    out = slurm_cluster.run(
        ["bash", str(TRAIN_SH), "--parsable", "-N", "2", *NO_GPU, str(DEBUG_CONFIG), *preempted],
        cwd=folders["two_nodes"],
        env=job_env(),
    ).stdout
    submitted["two_nodes"] = int(out.strip())
    result = {name: (submitted[name], folders[name]) for name in submitted}
    interrupt_after_first_step(slurm_cluster, {k: v for k, v in result.items() if k != "array"})
    return result


@pytest.mark.slow
def test_array_task_trains_its_seed_evaluates_and_reports(slurm_cluster, jobs) -> None:
    job, folder = jobs["array"]
    log = finished(slurm_cluster, job, folder)
    run = folder / "runs" / "debug-seed3"  # runs/<config stem>-seed<task id>
    assert "launch: python -m hpc_drseg train" in log  # no GPU, one CPU process: no launcher
    assert (run / "report.md").is_file() and (run / "eval_test.json").is_file(), sorted(p.name for p in run.iterdir())
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 3
    assert load_checkpoint(checkpoint_path(run))["progress"]["global_step"] == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, launch",
    [
        ("one_node", "accelerate launch * --multi_gpu --num_machines 1 --num_processes 2 *"),
        ("two_nodes", "srun --ntasks-per-node=1 * --num_machines 2 --num_processes 2 * --machine_rank *"),
    ],
    ids=["one_node_two_processes", "two_nodes"],
)
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, jobs, name: str, launch: str) -> None:
    job, folder = jobs[name]
    log = finished(slurm_cluster, job, folder)
    assert any(fnmatchcase(line, f"*launch: {launch}") for line in log.splitlines()), log[:3000]
    stopped = re.search(r"stopped by SIGTERM \(epoch (\d+), step (\d+)\)", log)
    resumed = re.search(r"resumed \S+last\.pt at epoch (\d+), step (\d+)", log)
    assert stopped and resumed, log[-6000:]
    assert "requeueing job" in log and "(restart 1)" in log
    # The requeued run starts at the step the stopped one checkpointed, and no step runs twice.
    assert resumed.groups() == stopped.groups() and 0 < int(stopped.group(2)) <= PREEMPTED_STEPS
    run = folder / "runs" / "preempted"
    assert load_checkpoint(checkpoint_path(run))["progress"]["global_step"] == PREEMPTED_STEPS
    assert f"finished 1 epochs (epoch 1, step {PREEMPTED_STEPS})" in log
    history = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[:2] for row in history[1:]] == [["0", str(PREEMPTED_STEPS)]]  # one validation, once
    assert log.count("replicas identical on all 2 ranks") == 2  # the stopped run and the resumed one
    assert (run / "report.md").is_file() and (run / "eval_test.json").is_file()
    states = slurm_cluster.run(["sacct", "--duplicates", "-X", "-n", "-P", "-j", str(job), "-o", "State"]).stdout
    assert states.split() == ["REQUEUED", "COMPLETED"]


# ------------------------------------------------------------------------------------------- fresh clone, no GPUs
# The defaults and GPU-less clusters offer 8 CPUs on this host's 2 cores: one math thread keeps the jobs from
# oversubscribing them (the script only sets OMP_NUM_THREADS when the caller has not).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def fresh_clone(folder: Path) -> Path:
    """`git clone` of the repository's HEAD: only committed files, as a user gets them."""
    clone = folder / "clone"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return clone


def tres_per_node(cluster, job: int) -> str:
    """What the job asked of each node beyond CPUs (`gres:gpu:1`, `gres:gpu:0`, or "" when nothing)."""
    found = re.search(r"TresPerNode=(\S+)", cluster.run(["scontrol", "show", "job", str(job)]).stdout)
    return found.group(1) if found else ""


@pytest.mark.slow
def test_readme_sbatch_command_completes_from_a_fresh_clone(defaults_cluster, shards_dir: Path, tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path)
    assert sorted(p.name for p in (clone / "logs").iterdir()) == [".gitkeep"]  # SLURM's --output folder is there
    # The README's first cluster command as it stands (no mkdir, no options): the script's own 1 GPU and 8 CPUs.
    job = defaults_cluster.sbatch(
        ["slurm/train.sh", "configs/debug.yaml", *tiny_overrides(shards_dir)], cwd=clone, env=job_env(**ONE_THREAD)
    )
    log = finished(defaults_cluster, job, clone)
    assert (clone / "logs" / f"drseg-{job}.out").is_file()
    assert tres_per_node(defaults_cluster, job) == "gres:gpu:1"
    assert "launch: python -m hpc_drseg train --config configs/debug.yaml" in log
    assert "training done; evaluating runs/debug" in log
    run = clone / "runs" / "debug"
    assert (run / "report.md").is_file() and (run / "eval_test.json").is_file(), sorted(p.name for p in run.iterdir())


def test_self_submission_keeps_the_gpu_request_where_the_partition_has_gpus(defaults_cluster, tmp_path: Path) -> None:
    out = defaults_cluster.run(
        ["bash", str(TRAIN_SH), "--parsable", str(DEBUG_CONFIG)], cwd=tmp_path, env=job_env(DRSEG_DRY_RUN="1")
    )
    assert train_sh_lines(out.stderr) == []  # nothing dropped, nothing to say
    job = int(out.stdout.strip())
    log = finished(defaults_cluster, job, tmp_path)
    assert tres_per_node(defaults_cluster, job) == "gres:gpu:1"
    assert f"python -m hpc_drseg train --config {DEBUG_CONFIG}" in log.splitlines()


def test_plain_sbatch_on_a_gpu_less_cluster_needs_gpus_per_node_0(gpu_less_cluster, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    args = [str(TRAIN_SH), str(DEBUG_CONFIG)]
    refused = subprocess.run(
        ["sbatch", *args], cwd=tmp_path, env={**gpu_less_cluster.env, **job_env()}, capture_output=True, text=True
    )
    assert refused.returncode == 1 and "Invalid generic resource" in refused.stderr, refused
    # What the README says to do there.
    job = gpu_less_cluster.sbatch(["--gpus-per-node=0", *args], cwd=tmp_path, env=job_env(DRSEG_DRY_RUN="1"))
    log = finished(gpu_less_cluster, job, tmp_path)
    assert f"python -m hpc_drseg train --config {DEBUG_CONFIG}" in log.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize(
    "partition", [[], ["-p", "debug"], ["--partition=debug"]], ids=["default", "-p", "--partition"]
)
def test_self_submission_drops_the_gpu_request_on_a_gpu_less_partition(
    gpu_less_cluster, shards_dir: Path, tmp_path: Path, partition: list[str]
) -> None:
    dry_run = partition != []  # one real training run is enough; the partition options only change the lookup
    env = job_env(**ONE_THREAD, **({"DRSEG_DRY_RUN": "1"} if dry_run else {}))
    out = gpu_less_cluster.run(
        ["bash", str(TRAIN_SH), "--parsable", *partition, str(DEBUG_CONFIG), *tiny_overrides(shards_dir)],
        cwd=tmp_path,
        env=env,
    )
    notices = train_sh_lines(out.stderr)
    assert len(notices) == 1 and notices[0].endswith(
        "] partition debug has no GPUs (no gpu GRES in sinfo): submitting with --gpus-per-node=0"
    ), out.stderr
    job = int(out.stdout.strip())
    log = finished(gpu_less_cluster, job, tmp_path)  # logs/ made by the script itself
    assert tres_per_node(gpu_less_cluster, job) == "gres:gpu:0"
    if dry_run:
        assert any(line.startswith("python -m hpc_drseg train --config") for line in log.splitlines()), log
    else:
        assert "training done; evaluating runs/debug" in log
        assert (tmp_path / "runs" / "debug" / "report.md").is_file()


# ---------------------------------------------------------------------------------------------- bad overrides
BAD_OVERRIDE = "train.batch_size=x"
BAD_OVERRIDE_ERROR = "drseg config: error: train.batch_size: got 'x' (str); expected int"


def test_bad_override_fails_the_job_early_with_one_line_and_status_2(defaults_cluster, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    job = defaults_cluster.sbatch([str(TRAIN_SH), str(DEBUG_CONFIG), BAD_OVERRIDE], cwd=tmp_path, env=job_env())
    log = finished(defaults_cluster, job, tmp_path, want="FAILED")
    lines = log.splitlines()
    assert len(lines) == 2 and lines[0] == BAD_OVERRIDE_ERROR, log
    assert lines[1].endswith(f"] configuration check failed (status 2): job {job} ends without training"), log
    exit_code = defaults_cluster.run(["sacct", "-X", "-n", "-P", "-j", str(job), "-o", "ExitCode"]).stdout.split()
    assert exit_code == ["2:0"]
    assert not (tmp_path / "runs").exists()


def test_bad_override_is_refused_before_self_submission(defaults_cluster, tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(TRAIN_SH), "--parsable", str(DEBUG_CONFIG), BAD_OVERRIDE],
        cwd=tmp_path,
        env={**defaults_cluster.env, **job_env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == "", done  # no job id: nothing was submitted
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0] == BAD_OVERRIDE_ERROR, done.stderr
    assert lines[1].endswith("] configuration check failed (status 2): nothing submitted"), done.stderr
    assert not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------------------------------ requeue rules
# A plain scancel stays a cancel, a stop without progress is not requeued, DRSEG_MAX_REQUEUES caps the requeues, and a
# time limit no longer than the --signal lead time is warned about. The three training jobs of `stopped` run side by
# side (one CPU each) with far more steps than they ever reach, so every stop lands mid-training; one polling loop
# sends each job its signals when its log shows the moment.
NEVER_REACHED_STEPS = 100_000  # the jobs are always stopped long before the epoch ends
USR2 = ["--signal=USR2", "--batch"]  # what --signal=B:USR2@90 sends before the time limit
CANCEL: list[str] = []  # a plain scancel
EXIT_RESUMABLE = 75


def segment(log: str, restart: int) -> str:
    """The part of the log written by the job's run number `restart` (0: the first), "" before it starts."""
    marker = f"(restart {restart}) on "
    return log[log.index(marker) :] if marker in log else ""


def trained_in(restart: int) -> Callable[[str], bool]:
    """The run `restart` has finished a step beyond the one it resumed at (or beyond 0 on a fresh start)."""

    def check(log: str) -> bool:
        part = segment(log, restart)
        resumed = re.search(r"resumed \S+last\.pt at epoch \d+, step (\d+)", part)
        if restart > 0 and not resumed:
            return False
        start = int(resumed.group(1)) if resumed else 0
        bars = [int(n) for n in re.findall(r"^epoch 0: .*\|\s*(\d+)/\d+ ", part, re.MULTILINE)]
        return any(n > start for n in bars)

    return check


def started(restart: int) -> Callable[[str], bool]:
    """The run `restart` has begun: its `[train.sh] job N (restart R)` line is in the log, nothing trained yet."""
    return lambda log: segment(log, restart) != ""


# name → (environment, [(what the log must show, what scancel then sends)]).
PLANS: dict[str, tuple[dict[str, str], list[tuple[Callable[[str], bool], list[str]]]]] = {
    "cancel": ({}, [(trained_in(0), CANCEL)]),
    # Requeued once (it trained), then stopped again as soon as the requeued run starts: no progress.
    "no_progress": ({}, [(trained_in(0), USR2), (started(1), USR2)]),
    # Trains in both runs; the second stop meets the cap.
    "cap": ({"DRSEG_MAX_REQUEUES": "1"}, [(trained_in(0), USR2), (trained_in(1), USR2)]),
}


def squeue_state(cluster, job: int) -> str:
    """squeue's %T for the job, "" once squeue no longer lists it."""
    return cluster.run(["squeue", "-h", "-j", str(job), "-o", "%T"]).stdout.strip()


def records(cluster, job: int) -> list[str]:
    """sacct's State of every run of the job, oldest first ("REQUEUED", …, "CANCELLED by 0")."""
    out = cluster.run(["sacct", "--duplicates", "-X", "-n", "-P", "-j", str(job), "-o", "State"]).stdout
    return [line for line in out.splitlines() if line]


def wait_final(cluster, job: int, folder: Path, max_restart: int) -> str:
    """Waits for the final state (first word); fails at once if the job starts a run beyond `max_restart`."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        log = job_log(folder)
        assert not started(max_restart + 1)(log), f"job {job} was requeued again; its log:\n{log[-4000:]}"
        runs = records(cluster, job)  # not cluster.job_state: it reads "CANCELLED by 0" as "0"
        state = runs[-1].split()[0] if runs else ""
        if state in FINAL_STATES:
            return state
        time.sleep(0.5)
    raise TimeoutError(f"job {job} did not end within {JOB_TIMEOUT_S} s; its log:\n{job_log(folder)[-4000:]}")


@pytest.fixture(scope="module")
def stopped(slurm_cluster, shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """name → (job id, submit folder, squeue states seen after the plain scancel), every plan carried out."""
    jobs: dict[str, tuple[int, Path]] = {}
    overrides = [f"data.shards={shards_dir}", f"train.steps_per_epoch={NEVER_REACHED_STEPS}", "train.max_epochs=1"]
    for name, (env, _) in PLANS.items():
        folder = tmp_path_factory.mktemp(name)
        (folder / "logs").mkdir()
        args = [*NO_GPU, str(TRAIN_SH), str(DEBUG_CONFIG), *overrides, "train.batch_size=1"]
        jobs[name] = (slurm_cluster.sbatch(args, cwd=folder, env=job_env(**env)), folder)
    try:
        after_cancel: list[str] = []
        pending = {name: list(steps) for name, (_, steps) in PLANS.items()}
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while any(pending.values()) and time.monotonic() < deadline:
            for name, steps in pending.items():
                job, folder = jobs[name]
                if steps and steps[0][0](job_log(folder)):
                    slurm_cluster.run(["scancel", *steps.pop(0)[1], str(job)])
                    if name == "cancel":  # from now on the job may only be COMPLETING, then gone
                        after_cancel.append(squeue_state(slurm_cluster, job))
            if not pending["cancel"] and (not after_cancel or after_cancel[-1]):
                after_cancel.append(squeue_state(slurm_cluster, jobs["cancel"][0]))
            time.sleep(0.2)
        left = {name: len(steps) for name, steps in pending.items() if steps}
        logs = {name: job_log(jobs[name][1])[-3000:] for name in left}
        assert not left, f"signals not sent within {JOB_TIMEOUT_S} s: {left}; logs: {logs}"
        yield {name: (job, folder, after_cancel if name == "cancel" else []) for name, (job, folder) in jobs.items()}
    finally:  # a job the script wrongly keeps requeueing must not run on for the rest of the session
        for job, _ in jobs.values():
            for args in (["--full", "--signal=KILL"], []):
                slurm_cluster.run(["bash", "-c", f"scancel {' '.join(args)} {job} || true"])


@pytest.mark.slow
def test_plain_scancel_cancels_and_the_job_is_never_queued_again(slurm_cluster, stopped) -> None:
    job, folder, seen = stopped["cancel"]
    assert set(seen) <= {"COMPLETING", ""}, f"job {job} {seen} after scancel; log:\n{job_log(folder)[-3000:]}"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while seen[-1] and time.monotonic() < deadline:  # COMPLETING until the trainer has checkpointed (≤ KillWait)
        seen.append(squeue_state(slurm_cluster, job))
        assert seen[-1] in {"COMPLETING", ""}, f"job {job} {seen[-1]} after scancel; log:\n{job_log(folder)[-3000:]}"
        time.sleep(0.5)
    assert set(seen) == {"COMPLETING", ""} and seen[-1] == "", seen
    assert wait_final(slurm_cluster, job, folder, max_restart=0) == "CANCELLED"
    assert [r.split(" by ")[0] for r in records(slurm_cluster, job)] == ["CANCELLED"]  # one run: never requeued
    assert records(slurm_cluster, job)[0].startswith("CANCELLED by "), records(slurm_cluster, job)
    log = job_log(folder)
    notice = f"] SIGTERM while job {job} is COMPLETING (cancelled, timed out or preempted): it will not be requeued"
    assert any(line.endswith(notice) for line in train_sh_lines(log)), log[-3000:]
    assert "requeueing job" not in log


def refusal(cluster, job: int, folder: Path, max_restart: int) -> str:
    """The job ended FAILED with status 75 after `max_restart` requeues; returns its last [train.sh] line."""
    state = wait_final(cluster, job, folder, max_restart)
    log = job_log(folder)
    assert state == "FAILED", f"job {job} ended {state}; its log:\n{log[-4000:]}"
    assert records(cluster, job) == ["REQUEUED"] * max_restart + ["FAILED"]
    exit_code = cluster.run(["sacct", "-X", "-n", "-P", "-j", str(job), "-o", "ExitCode"]).stdout.split()
    assert exit_code == [f"{EXIT_RESUMABLE}:0"]
    assert log.count("requeueing job") == max_restart, log[-4000:]
    return train_sh_lines(log)[-1]


@pytest.mark.slow
def test_a_stop_without_progress_is_not_requeued(slurm_cluster, stopped) -> None:
    job, folder, _ = stopped["no_progress"]
    last = refusal(slurm_cluster, job, folder, max_restart=1)
    assert re.search(
        r"\] (training )?stopped by USR2 .*; not requeued: no progress since this run started \(\S+/"
        r"checkpoints/last\.pt at global step [1-9]\d*, as at the start;",
        last,
    ), last


@pytest.mark.slow
def test_max_requeues_caps_requeues_of_a_job_that_trains(slurm_cluster, stopped) -> None:
    job, folder, _ = stopped["cap"]
    last = refusal(slurm_cluster, job, folder, max_restart=1)
    assert re.search(
        rf"\] training stopped by USR2 \(status {EXIT_RESUMABLE}\); not requeued: job {job} was already requeued 1 "
        r"times \(DRSEG_MAX_REQUEUES=1\); resubmit the same command to resume from \S+/checkpoints/last\.pt$",
        last,
    ), last


# ---------------------------------------------------------------------------------------------- time limit
@pytest.mark.parametrize(
    "options, warned",
    [
        (["--time=1"], "(60 s) is not longer than the --signal lead time (90 s)"),  # the script's B:USR2@90
        (["--time=5", "--signal=B:USR2@400"], "(300 s) is not longer than the --signal lead time (400 s)"),
        (["--time=5"], None),
    ],
    ids=["script_signal", "command_line_signal", "long_enough"],
)
def test_time_limit_not_longer_than_the_signal_lead_is_warned_about(
    slurm_cluster, tmp_path: Path, options: list[str], warned: str | None
) -> None:
    (tmp_path / "logs").mkdir()
    args = [*NO_GPU, *options, str(TRAIN_SH), str(DEBUG_CONFIG)]
    job = slurm_cluster.sbatch(args, cwd=tmp_path, env=job_env(DRSEG_DRY_RUN="1"))
    state = slurm_cluster.wait_state(job, timeout_s=120)
    lines = train_sh_lines(job_log(tmp_path))
    warnings = [line for line in lines if "] warning: " in line]
    if warned is None:
        assert state == "COMPLETED", lines
        assert warnings == []
    else:
        # The warned-about case itself: SLURM signals such a job as it starts. On a busy machine the signal can come
        # before the dry run ends, and the job then stops, unrequeued, as the warning says (any signal is caught from
        # the script's first line, so the warning is printed either way).
        stopped = any("stopped by USR2 before training started; not requeued: no progress" in line for line in lines)
        assert state == "COMPLETED" or (state == "FAILED" and stopped), (state, lines)
        assert len(warnings) == 1 and f"] warning: the time limit {warned}: SLURM signals the job" in warnings[0], (
            warnings
        )
