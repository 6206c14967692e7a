"""Every run can be stopped, killed and resumed exactly and never hangs: signals during set-up, launchers that die,
ranks that disagree on the checkpoint, world-size changes, RNG and train metrics in the same commit as last.pt."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from hpc_drseg.train.checkpoint import checkpoint_path, load_checkpoint
from hpc_drseg.train.lock import RunLock
from hpc_drseg.train.signals import EXIT_RESUMABLE

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
