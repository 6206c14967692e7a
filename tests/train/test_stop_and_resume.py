"""Every run can be stopped, killed and resumed exactly and never hangs: signals during set-up, launchers that die,
ranks that disagree on the checkpoint, world-size changes, RNG and train metrics in the same commit as last.pt."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from hpc_drseg.config import load_config
from hpc_drseg.errors import InputError
from hpc_drseg.train.checkpoint import checkpoint_path, load_checkpoint
from hpc_drseg.train.lock import RunLock
from hpc_drseg.train.signals import EXIT_RESUMABLE
from hpc_drseg.train.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[2]
DEBUG_YAML = REPO / "configs" / "debug.yaml"
TINY = ["train.steps_per_epoch=3", "data.augment.preset=paper", "eval.score_bits=8"]
DEADLINE_S = 240  # generous: a 2-core machine shared with other jobs


def overrides(shards_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards_dir}", f"train.run_dir={run_dir}", *TINY, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


# A `drseg train` that sends itself SIGTERM while the Trainer reads the manifest, i.e. in the middle of set-up.
SIGNAL_DURING_SETUP = textwrap.dedent(
    """
    import os, signal, sys
    import hpc_drseg.train.trainer as trainer
    from hpc_drseg.cli import main

    real = trainer.read_manifest

    def read_manifest(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    trainer.read_manifest = read_manifest
    raise SystemExit(main(sys.argv[1:]))
    """
)


def test_sigterm_during_setup_exits_resumable_and_writes_nothing(shards_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", SIGNAL_DURING_SETUP, "train", "--config", str(DEBUG_YAML)]
    done = subprocess.run(
        [*cmd, *overrides(shards_dir, run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=_env(),
    )
    assert done.returncode == EXIT_RESUMABLE, (done.returncode, done.stderr[-3000:])
    assert "stopped by SIGTERM" in done.stdout + done.stderr
    assert not run_dir.exists(), sorted(str(p) for p in run_dir.rglob("*"))


def _torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert proc is None or proc.poll() is None, f"launcher exited ({proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_ranks_stop_with_a_checkpoint_when_their_launcher_is_killed(shards_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [*_torchrun(29541), "-m", "hpc_drseg", "train", "--config", str(DEBUG_YAML)]
    cmd += overrides(shards_dir, run_dir, "train.max_epochs=100", "train.checkpoint_every_steps=1")
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    ranks: list[psutil.Process] = []
    try:
        _wait_for(lambda: checkpoint_path(run_dir, "last").is_file(), "last.pt", launcher)  # training is under way
        ranks = psutil.Process(launcher.pid).children()
        assert len(ranks) == 2, ranks
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        killed = time.monotonic()
        _, alive = psutil.wait_procs(ranks, timeout=DEADLINE_S)
        exited_s = time.monotonic() - killed
        assert not alive, f"ranks {[p.pid for p in alive]} still running {exited_s:.0f} s after their launcher died"
        print(f"both ranks exited {exited_s:.1f} s after the launcher was killed")
    finally:
        for rank in ranks:  # only the ranks this test started, should the assertion above have failed
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.kill()
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    state = load_checkpoint(checkpoint_path(run_dir, "last"))
    assert state["progress"]["global_step"] >= 1
    RunLock.acquire(run_dir).release()  # the ranks let go of the run folder: a later run can take it


# ------------------------------------------------------------------------------------- what a 2-rank last.pt holds
@pytest.fixture(scope="module")
def two_rank_run(shards_dir, tmp_path_factory) -> Path:
    """One step of a 2-rank DDP run (torchrun, gloo): last.pt at epoch 0, step 1, written by 2 ranks."""
    run_dir = tmp_path_factory.mktemp("two_ranks") / "run"
    done = _run([*_torchrun(29542), "-m", "hpc_drseg"], shards_dir, run_dir, "train.max_steps=1")
    assert done.returncode == 0, done.stdout[-4000:]
    return run_dir


def _run(launcher: list[str], shards_dir: Path, run_dir: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    """`launcher … train`; the launcher and every process under it are killed should it hang."""
    cmd = [*launcher, "train", "--config", str(DEBUG_YAML), *overrides(shards_dir, run_dir, *extra)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        # The launcher and its ranks, which torch.distributed.run starts in sessions of their own.
        for started in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                started.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"no exit within {DEADLINE_S} s (hung); output:\n{output[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def test_last_pt_holds_every_ranks_rng(two_rank_run):
    state = load_checkpoint(checkpoint_path(two_rank_run, "last"))
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # seeded per rank
    assert torch.equal(state["rng_ranks"][0]["torch"], state["rng"]["torch"])
    assert not list(two_rank_run.glob("checkpoints/rng-rank*.pt")), "no RNG file outside last.pt's commit"


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_another_world_size_is_refused_unless_allowed(shards_dir, two_rank_run, tmp_path, caplog):
    run_dir = _copy(two_rank_run, tmp_path)
    last = checkpoint_path(run_dir, "last")
    before = last.read_bytes()
    cfg = load_config(DEBUG_YAML, overrides(shards_dir, run_dir, "train.max_steps=4"))
    with pytest.raises(InputError, match=r"written by 2 ranks but this run has 1; .*--allow-world-size-change"):
        train(cfg)
    assert last.read_bytes() == before
    result = train(cfg, allow_world_size_change=True)
    # Epoch 0 was one step in: the new world size starts at epoch 1 and finishes it (3 steps, then validation).
    assert result.exit_code == 0 and result.progress.global_step == 4 and result.progress.epoch == 2
    assert [row["epoch"] for row in result.progress.history] == [1]
    assert "no longer bit-exact" in caplog.text
    assert load_checkpoint(last)["world_size"] == 1


# Rank 1 reads last.pt through a stale view of the run folder (another node's out-of-date copy).
STALE_VIEW = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import hpc_drseg.train.checkpoint as checkpoint
    from hpc_drseg.cli import main

    real = checkpoint.checkpoint_path

    def checkpoint_path(run_dir, which="last"):
        stale = os.environ["RANK"] == "1" and which == "last"
        return Path(os.environ["STALE_LAST_PT"]) if stale else real(run_dir, which)

    checkpoint.checkpoint_path = checkpoint_path
    raise SystemExit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_ranks_that_read_different_checkpoints_stop_together(shards_dir, two_rank_run, tmp_path):
    run_dir = _copy(two_rank_run, tmp_path)
    state = load_checkpoint(checkpoint_path(run_dir, "last"))
    state["progress"].update(global_step=0, step_in_epoch=0)
    stale = tmp_path / "stale-last.pt"
    torch.save(state, stale)
    launcher = [*_torchrun(29543), "--no_python", sys.executable, "-c", STALE_VIEW]
    done = _run(launcher, shards_dir, run_dir, "train.max_steps=3", env={**_env(), "STALE_LAST_PT": str(stale)})
    assert done.returncode != 0
    expected = r"the ranks read different \S+last\.pt \(rank 0: step 1 \(epoch 0, step 1 in it\); rank 1: step 0 "
    assert re.search(expected, done.stdout), done.stdout[-4000:]
    assert load_checkpoint(checkpoint_path(run_dir, "last"))["progress"]["global_step"] == 1  # nothing trained


# ------------------------------------------------------------------------------------- epoch rows of resumed runs
@pytest.fixture(scope="module")
def reference_history(shards_dir, tmp_path_factory) -> list[dict[str, float]]:
    """The history rows of two uninterrupted epochs (3 steps each)."""
    result = train(load_config(DEBUG_YAML, overrides(shards_dir, tmp_path_factory.mktemp("reference") / "run")))
    assert result.exit_code == 0 and result.progress.global_step == 6
    return result.progress.history


def _same_rows(rows: list[dict[str, float]], reference: list[dict[str, float]]) -> None:
    """Every figure the same (bit-exact on one process), except wall-clock ones."""
    timed = {"epoch_time_s", "img_per_s"}
    assert [{k: v for k, v in row.items() if k not in timed} for row in rows] == [
        {k: v for k, v in row.items() if k not in timed} for row in reference
    ]


def test_epoch_resumed_mid_way_has_the_train_metrics_of_all_its_steps(shards_dir, tmp_path, reference_history):
    run_dir = tmp_path / "run"
    assert train(load_config(DEBUG_YAML, overrides(shards_dir, run_dir, "train.max_steps=4"))).exit_code == 0
    result = train(load_config(DEBUG_YAML, overrides(shards_dir, run_dir)))
    _same_rows(result.progress.history, reference_history)


def test_sigterm_on_the_last_step_of_an_epoch_resumes_to_the_same_row(shards_dir, tmp_path, reference_history):
    cfg = load_config(DEBUG_YAML, overrides(shards_dir, tmp_path / "run"))
    trainer = Trainer(cfg)
    real_step = trainer.train_step

    def train_step(batch):
        terms = real_step(batch)
        if trainer.progress.global_step == 2:  # the step about to be counted is epoch 0's last
            trainer.stop.request("SIGTERM")
        return terms

    trainer.train_step = train_step
    stopped = trainer.fit()
    assert stopped.exit_code == EXIT_RESUMABLE and (stopped.progress.epoch, stopped.progress.step_in_epoch) == (0, 3)
    assert stopped.progress.history == []
    result = train(cfg)
    _same_rows(result.progress.history, reference_history)
