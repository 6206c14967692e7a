"""DeepSpeed's share of a checkpoint, committed together with last.pt.

ZeRO partitions the optimiser state across ranks, so every rank writes its part through Accelerate's save_state; it
cannot go inside last.pt. Written in place, a kill during that save left a truncated partition that no rerun could
read, and a kill after it but before last.pt resumed the weights of one step with the progress of another. So:

1. every rank writes into a temporary folder that rank 0 named (`.deepspeed-step<N>-<token>.<host>.<pid>…tmp`);
2. after a barrier, every rank fsyncs what it wrote and rank 0 renames the folder to `deepspeed-step<N>-<token>`;
3. the caller commits last.pt naming that folder (key DEEPSPEED_KEY);
4. only then rank 0 deletes every other DeepSpeed folder of the run.

A kill before 3 leaves last.pt naming the previous folder, which still exists; a kill after 3 leaves extra folders
that the next save deletes. A resume loads exactly the folder last.pt names. Checkpoints of the earlier layout name
none and load checkpoints/deepspeed/.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_drseg.atomic import fsync_folder, fsync_tree, temporary_path
from hpc_drseg.errors import InputError
from hpc_drseg.train.runtime import broadcast_from_rank_0

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("hpc_drseg.train")

DEEPSPEED_KEY = "deepspeed_state"
"""last.pt's key for the name of the DeepSpeed folder committed with it."""
LEGACY_FOLDER = "deepspeed"
"""The earlier layout's single folder, written in place."""
_STEP_TAGGED = re.compile(r"deepspeed-step[0-9]+-[0-9a-f]{8}")
# Temporaries of step-tagged folders: atomic.temporary_path's `.NAME.HOST.PID.TOKEN.tmp`.
_TEMPORARY = re.compile(r"\.deepspeed-step[0-9]+-[0-9a-f]{8}\..+\.tmp")


def new_folder_name(step: int) -> str:
    """A fresh step-tagged name; the token keeps a second save at the same step (a resumed run stopped at once) off
    the folder that the committed last.pt names."""
    return f"deepspeed-step{step:09d}-{secrets.token_hex(4)}"


def committed_folder(checkpoint_dir: Path, state: dict[str, Any]) -> Path:
    """The DeepSpeed folder that a loaded last.pt belongs to."""
    return checkpoint_dir / str(state.get(DEEPSPEED_KEY) or LEGACY_FOLDER)


def run_folders(checkpoint_dir: Path) -> list[Path]:
    """Every DeepSpeed state folder of the run (step-tagged and the earlier layout's): names only this module
    gives, so nothing else in the folder is ever touched."""
    try:
        names = sorted(os.listdir(checkpoint_dir))
    except FileNotFoundError:
        return []
    return [checkpoint_dir / n for n in names if _STEP_TAGGED.fullmatch(n) or n == LEGACY_FOLDER]


def save(accelerator: Accelerator, checkpoint_dir: Path, step: int) -> str:
    """Steps 1 and 2 above, on every rank (collective); returns the folder name for last.pt."""
    name = new_folder_name(step)
    temporary = temporary_path(checkpoint_dir / name)
    name, temporary = broadcast_from_rank_0((name, temporary), accelerator.num_processes)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    # Every rank syncs: on a shared file system each node flushes what it wrote itself.
    fsync_tree(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.rename(temporary, checkpoint_dir / name)
        fsync_folder(checkpoint_dir)
    accelerator.wait_for_everyone()
    return name


def load(accelerator: Accelerator, checkpoint_dir: Path, state: dict[str, Any], path: Path) -> None:
    """Loads exactly the folder committed with last.pt (`path`)."""
    folder = committed_folder(checkpoint_dir, state)
    if not folder.is_dir():
        raise InputError(
            f"{path} belongs to the DeepSpeed state {folder}, which is missing; restore that folder beside it, or "
            f"move {path} away to start the run afresh"
        )
    accelerator.load_state(str(folder))


def remove_others(checkpoint_dir: Path, keep: str) -> None:
    """Step 4 (rank 0 only, after last.pt naming `keep` is committed): the run's other DeepSpeed folders, and
    temporaries of saves that a kill interrupted."""
    for folder in run_folders(checkpoint_dir):
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)
    remove_temporaries(checkpoint_dir)


def remove_temporaries(checkpoint_dir: Path) -> None:
    """Temporary DeepSpeed folders: all are stale, because the caller holds the run-folder lock (no other writer)
    and calls this only when no save of its own is under way."""
    try:
        names = os.listdir(checkpoint_dir)
    except FileNotFoundError:
        return
    for name in names:
        if _TEMPORARY.fullmatch(name):
            shutil.rmtree(checkpoint_dir / name, ignore_errors=True)
            log.info("removed %s, the DeepSpeed state of a save that was interrupted", checkpoint_dir / name)
