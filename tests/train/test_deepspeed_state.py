"""DeepSpeed's share of a checkpoint commits with last.pt: the folder protocol on a plain Accelerator (fast), and real
DeepSpeed runs killed with SIGKILL during a save and just after it, which must resume bit-identical."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from hpc_drseg.errors import InputError
from hpc_drseg.train import deepspeed_state
from hpc_drseg.train.checkpoint import checkpoint_path, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
DEBUG_YAML = REPO / "configs" / "debug.yaml"
ZERO2 = REPO / "launch" / "accelerate_deepspeed_zero2.yaml"
DEADLINE_S = 300  # a 2-core machine shared with other jobs; DeepSpeed's start-up alone takes ~30 s there


# ------------------------------------------------------------------------------------------ the folder protocol
@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(torch.nn.Linear(3, 2), torch.optim.Adam(torch.nn.Linear(3, 2).parameters()))
    yield acc
    del model, optimizer


def test_save_renames_a_complete_folder_and_leaves_no_temporary(accelerator, tmp_path):
    name = deepspeed_state.save(accelerator, tmp_path, step=7)
    assert re.fullmatch(r"deepspeed-step000000007-[0-9a-f]{8}", name)
    assert (tmp_path / name).is_dir() and any((tmp_path / name).iterdir())
    assert [p.name for p in tmp_path.iterdir()] == [name]
    again = deepspeed_state.save(accelerator, tmp_path, step=7)  # same step: never over the committed folder
    assert again != name and {p.name for p in tmp_path.iterdir()} == {name, again}


def test_others_go_only_on_request_and_foreign_files_stay(accelerator, tmp_path):
    old = deepspeed_state.save(accelerator, tmp_path, step=1)
    new = deepspeed_state.save(accelerator, tmp_path, step=2)
    (tmp_path / "deepspeed").mkdir()  # the earlier layout's folder
    interrupted = tmp_path / ".deepspeed-step000000003-0123abcd.node1.77.89abcdef.tmp"
    interrupted.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "deepspeed-backup").mkdir()
    deepspeed_state.remove_others(tmp_path, keep=new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deepspeed-backup", new, "notes.txt"]
    assert old != new


def test_load_reads_the_folder_last_pt_names(accelerator, tmp_path):
    name = deepspeed_state.save(accelerator, tmp_path, step=4)
    deepspeed_state.load(accelerator, tmp_path, {deepspeed_state.DEEPSPEED_KEY: name}, tmp_path / "last.pt")
    legacy = deepspeed_state.committed_folder(tmp_path, {})
    assert legacy == tmp_path / "deepspeed"  # a last.pt of the earlier layout names no folder
    with pytest.raises(InputError, match=r"last\.pt belongs to the DeepSpeed state \S+deepspeed-step000000009-"):
        deepspeed_state.load(
            accelerator,
            tmp_path,
            {deepspeed_state.DEEPSPEED_KEY: "deepspeed-step000000009-00000000"},
            tmp_path / "last.pt",
        )


# ------------------------------------------------------------------------------------ real DeepSpeed, killed
def _command(shards_dir: Path, run_dir: Path, port: int) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO2)]
    launcher += ["--num_processes", "1", "--main_process_port", str(port)]
    settings = ["train.steps_per_epoch=3", "data.augment.preset=paper", "eval.score_bits=8", "train.max_steps=5"]
    settings += ["train.checkpoint_every_steps=1", f"data.shards={shards_dir}", f"train.run_dir={run_dir}"]
    return [*launcher, "-m", "hpc_drseg", "train", "--config", str(DEBUG_YAML), *settings]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


def _kill_tree(proc: subprocess.Popen) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    proc.wait()


def _run_until(cmd: list[str], seen: re.Pattern[str] | None, folder: Path) -> str:
    """Runs `cmd`; with `seen`, SIGKILLs the launcher and its rank the moment an entry of `folder` matches it and
    returns that entry's name (else runs to the end and returns "")."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while seen is not None and proc.poll() is None:
            assert time.monotonic() < deadline, f"nothing matching {seen.pattern} within {DEADLINE_S} s"
            hits = [n for n in (os.listdir(folder) if folder.is_dir() else []) if seen.fullmatch(n)]
            if hits:
                _kill_tree(proc)
                return hits[0]
            time.sleep(0.002)
        output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert seen is None, f"the run ended before {seen.pattern} appeared:\n{output[-3000:]}"
    assert proc.returncode == 0, output[-4000:]
    return ""


@pytest.mark.slow
def test_kill_during_and_after_a_deepspeed_save_resumes_bit_identical(shards_dir, tmp_path):
    pytest.importorskip("deepspeed")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _run_until(_command(shards_dir, reference, 29571), None, reference)
    folder = killed / "checkpoints"
    # 1. During step 2's save: its temporary folder exists, last.pt still names step 1's.
    during = _run_until(_command(shards_dir, killed, 29572), re.compile(r"\.deepspeed-step000000002-.*\.tmp"), folder)
    assert during
    # 2. Just after step 3's folder got its final name, before (or while) last.pt is rewritten to name it.
    after = _run_until(_command(shards_dir, killed, 29573), re.compile(r"deepspeed-step000000003-[0-9a-f]{8}"), folder)
    assert after
    # 3. To the end.
    _run_until(_command(shards_dir, killed, 29574), None, folder)
    last = load_checkpoint(checkpoint_path(killed, "last"))
    expected = load_checkpoint(checkpoint_path(reference, "last"))
    assert last["progress"]["global_step"] == 5
    different = [k for k in expected["model"] if not torch.equal(last["model"][k], expected["model"][k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    # The optimiser's state too: DeepSpeed's partition of the last save against the reference's.
    ours = _optimizer_state(killed, last)
    theirs = _optimizer_state(reference, expected)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [p.name for p in deepspeed_state.run_folders(folder)] == [last[deepspeed_state.DEEPSPEED_KEY]]
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def _optimizer_state(run_dir: Path, last: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the ZeRO optimiser partition committed with `last`, by a flat key."""
    files = sorted(deepspeed_state.committed_folder(run_dir / "checkpoints", last).rglob("*optim_states.pt"))
    assert files, f"no optimiser partition under {run_dir}"
    flat: dict[str, torch.Tensor] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, torch.Tensor):
            flat[prefix] = node
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}")
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                walk(value, f"{prefix}/{index}")

    for path in files:
        walk(torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"], path.name)
    return flat
