"""Guarantees, run folders: a run folder is never corrupted or silently reinterpreted, and inputs that would fail only
after an epoch of compute fail before step 0, each in one line naming the key, file, shard or sample (exit 2).

A resume whose config changes what the run computes stops unless --allow-config-change (then it is recorded); a
second training on a locked run folder is refused, naming the holder; eval and predict load only run checkpoints of
the architecture they build; shards must hold exactly what their manifest lists, at its image size."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from guarantees_harness import Case

DEBUG = ("--config", "{repo}/configs/debug.yaml", "data.shards={shards}", "train.run_dir={tmp}/run")
TRAIN = ("train", *DEBUG)
ONE_STEP = ("train.max_steps=1",)
ONE_EPOCH = ("train.steps_per_epoch=1", "train.max_epochs=1")
RUN_FILES = ("{tmp}/run/checkpoints", "{tmp}/run/config.yaml", "{tmp}/run/metrics.csv", "{tmp}/run/tb")
SLOW_S = 300.0  # rows that build a model or train: room for a 2-core machine shared with other jobs
Setup = Callable[[Mapping[str, Path]], None]
_HOLDERS: list[subprocess.Popen] = []  # lock-holding helper processes, stopped after each test


@pytest.fixture(autouse=True)
def _stop_lock_holders():
    yield
    while _HOLDERS:
        holder = _HOLDERS.pop()
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------------------ setups
def steps(*setups: Setup) -> Setup:
    def setup(paths) -> None:
        for one in setups:
            one(paths)

    return setup


def trained(*extra: str) -> Setup:
    """A run trained in {tmp}/run by its own `drseg train` process (so its lock is released as in real use)."""

    def setup(paths) -> None:
        argv = [arg.format(**{k: str(v) for k, v in paths.items()}) for arg in (*TRAIN, *extra)]
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
        done = subprocess.run([sys.executable, "-m", "hpc_drseg", *argv], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    return setup


def _debug_config(paths, *overrides: str):
    from hpc_drseg.config import load_config

    repo, shards, tmp = paths["repo"], paths["shards"], paths["tmp"]
    return load_config(
        repo / "configs" / "debug.yaml", [f"data.shards={shards}", f"train.run_dir={tmp}/run", *overrides]
    )


def _checkpoint(paths, *overrides: str) -> dict:
    """A run checkpoint (untrained weights) of the debug config with `overrides`: no training needed to score it."""
    from hpc_drseg.config import config_to_dict
    from hpc_drseg.models import build_model

    cfg = _debug_config(paths, *overrides)
    progress = {"epoch": 1, "step_in_epoch": 0, "global_step": 1, "history": []}
    return {"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg), "progress": progress}


def run_folder(content: Callable[[Mapping[str, Path]], object]) -> Setup:
    """{tmp}/run as drseg train leaves it (config.yaml of the debug config), with `content(paths)` as best.pt."""

    def setup(paths) -> None:
        import torch

        from hpc_drseg.config import save_config

        save_config(_debug_config(paths), paths["tmp"] / "run" / "config.yaml")
        (paths["tmp"] / "run" / "checkpoints").mkdir()
        torch.save(content(paths), paths["tmp"] / "run" / "checkpoints" / "best.pt")

    return setup


def file_at(relative: str, content: Callable[[Mapping[str, Path]], object]) -> Setup:
    def setup(paths) -> None:
        import torch

        target = paths["tmp"] / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        value = content(paths)
        if isinstance(value, bytes):
            target.write_bytes(value)
        else:
            torch.save(value, target)

    return setup


def photo(paths) -> None:
    import cv2
    import numpy as np

    (paths["tmp"] / "photos").mkdir()
    cv2.imwrite(str(paths["tmp"] / "photos" / "eye.png"), np.full((96, 112, 3), 90, np.uint8))


def bare_state_dict(paths) -> dict:
    return _checkpoint(paths)["model"]


def unet_weights_under_a_wider_config(paths) -> dict:
    from hpc_drseg.config import config_to_dict

    state = _checkpoint(paths, "model.name=unet", "model.unet_base_width=4")
    return {**state, "config": config_to_dict(_debug_config(paths, "model.name=unet", "model.unet_base_width=8"))}


def edit_manifest(edit: Callable[[dict], None]) -> Setup:
    def setup(paths) -> None:
        path = paths["shards"] / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest, indent=1))

    return setup


def no_split(split: str) -> Setup:
    return edit_manifest(lambda manifest: manifest["splits"].pop(split))


def empty_split(split: str) -> Setup:
    def edit(manifest: dict) -> None:
        manifest["splits"][split].update(images=0, ids=[], shards=[], shard_sizes=[])

    return edit_manifest(edit)


def renamed_test_id(manifest: dict) -> None:
    manifest["splits"]["test"]["ids"][1] = "not-in-the-shard"


def remove(relative: str) -> Setup:
    return lambda paths: (paths["shards"] / relative).unlink()


def shrunk_train_shards(paths) -> None:
    """Every training image and mask rewritten at half the manifest's side (64 px), ids and manifest unchanged."""
    import cv2
    import numpy as np

    from hpc_drseg.data.manifest import iter_shard_samples

    for path in sorted(paths["shards"].glob("train-*.tar")):
        samples = list(iter_shard_samples(path))
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for raw in samples:
                for ext, data in raw.items():
                    if ext in ("image.png", "mask.png"):
                        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
                        data = cv2.imencode(".png", cv2.resize(array, (64, 64), interpolation=cv2.INTER_NEAREST))[1]
                        data = data.tobytes()
                    if ext != "__key__":
                        member = tarfile.TarInfo(f"{raw['__key__']}.{ext}")
                        member.size = len(data)
                        tar.addfile(member, io.BytesIO(data))


HOLD = """
import sys, time
from hpc_drseg.train.lock import RunLock
lock = RunLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


def lock_held(paths) -> None:
    """Another process holds {tmp}/run's lock, as a training running there does; {holder} names it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(paths["tmp"] / "run")], stdout=subprocess.PIPE, text=True
    )
    _HOLDERS.append(holder)
    assert holder.stdout.readline().strip() == "held"
    paths["holder"] = f"PID {holder.pid} on host {socket.gethostname()}"


def stale_lock(paths) -> None:
    """The lock file of a training that died (SIGKILL, lost node): its record is there, its flock went with it."""
    record = {"host": "node-that-died", "pid": 4242, "since": "2025-01-01T00:00:00+00:00"}
    (paths["tmp"] / "run").mkdir()
    (paths["tmp"] / "run" / ".lock").write_text(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------------- table
CASES = [
    Case(
        "resume with a changed lr",
        (*TRAIN, "train.max_steps=2", "optim.lr=1e-3"),
        2,
        "optim.lr: 0.0001 → 0.001",
        setup=trained(*ONE_STEP),
        needs=("shards",),
        timeout_s=SLOW_S,
        untouched=RUN_FILES,
        absent=("{tmp}/run/config_changes.jsonl",),
    ),
    Case(
        "resume with a changed lr, allowed",
        (*TRAIN, "train.max_steps=2", "optim.lr=1e-3", "--allow-config-change"),
        0,
        "optim.lr: 0.0001 → 0.001",
        setup=trained(*ONE_STEP),
        needs=("shards",),
        timeout_s=SLOW_S,
    ),
    Case(
        "resume-safe change",
        (*TRAIN, "train.steps_per_epoch=1", "train.max_epochs=2"),
        0,
        "train.max_epochs: 1 → 2",
        setup=trained(*ONE_EPOCH),
        needs=("shards",),
        timeout_s=SLOW_S,
    ),
    Case(
        "eval of another architecture",
        ("eval", "--run", "{tmp}/run"),
        2,
        "holds another architecture than {tmp}/run/config.yaml",
        setup=run_folder(lambda paths: _checkpoint(paths, "model.name=unet")),
        needs=("shards",),
        timeout_s=SLOW_S,
        untouched=("{tmp}/run",),
        absent=("{tmp}/run/eval_test.json", "{tmp}/run/report.md"),
    ),
    Case(
        "eval of a foreign .pt",
        ("eval", "--run", "{tmp}/run"),
        2,
        "{tmp}/run/checkpoints/best.pt is not a hpc_drseg checkpoint: it holds a bare state dict",
        setup=run_folder(bare_state_dict),
        needs=("shards",),
        timeout_s=SLOW_S,
        untouched=("{tmp}/run",),
        absent=("{tmp}/run/eval_test.json",),
    ),
    Case(
        "predict with a foreign .pt",
        ("predict", "--checkpoint", "{tmp}/foreign.pt", "--input", "{tmp}/photos", "--out", "{tmp}/out"),
        2,
        "{tmp}/foreign.pt is not a hpc_drseg checkpoint",
        setup=steps(photo, file_at("foreign.pt", bare_state_dict)),
        needs=("shards",),
        timeout_s=SLOW_S,
        absent=("{tmp}/out",),
    ),
    Case(
        "predict with a file that is not a checkpoint",
        ("predict", "--checkpoint", "{tmp}/notes.pt", "--input", "{tmp}/photos", "--out", "{tmp}/out"),
        2,
        "{tmp}/notes.pt is not a readable hpc_drseg checkpoint",
        setup=steps(photo, file_at("notes.pt", lambda paths: b"lr 1e-4, 3 epochs\n")),
        absent=("{tmp}/out",),
    ),
    Case(
        "predict with weights of another architecture",
        ("predict", "--checkpoint", "{tmp}/best.pt", "--input", "{tmp}/photos", "--out", "{tmp}/out"),
        2,
        "{tmp}/best.pt does not fit the UNet its config builds",
        setup=steps(photo, file_at("best.pt", unet_weights_under_a_wider_config)),
        needs=("shards",),
        timeout_s=SLOW_S,
        absent=("{tmp}/out",),
    ),
    Case(
        "no validation split",
        (*TRAIN, *ONE_EPOCH),
        2,
        "split 'valid' is not in the shards {shards}",
        setup=no_split("valid"),
        needs=("shards",),
        timeout_s=SLOW_S,
        absent=("{tmp}/run",),
    ),
    Case(
        "no train split",
        (*TRAIN, *ONE_EPOCH),
        2,
        "split 'train' is not in the shards {shards}",
        setup=no_split("train"),
        needs=("shards",),
        timeout_s=SLOW_S,
        absent=("{tmp}/run",),
    ),
    Case(
        "validation split without images",
        (*TRAIN, *ONE_EPOCH),
        2,
        "split 'valid' (data.val_split) in the shards {shards} holds no images",
        setup=empty_split("valid"),
        needs=("shards",),
        timeout_s=SLOW_S,
        absent=("{tmp}/run",),
    ),
    Case(
        "missing training shard",
        (*TRAIN, *ONE_EPOCH),
        2,
        "shard {shards}/train-000002.tar listed in {shards}/manifest.json is missing",
        setup=remove("train-000002.tar"),
        needs=("shards",),
        timeout_s=SLOW_S,
        absent=("{tmp}/run",),
    ),
    Case(
        "missing validation shard",
        (*TRAIN, *ONE_EPOCH),
        2,
        "shard {shards}/valid-000001.tar listed in {shards}/manifest.json is missing",
        setup=remove("valid-000001.tar"),
        needs=("shards",),
        timeout_s=SLOW_S,
        absent=("{tmp}/run",),
    ),
    Case(
        "eval of shards whose ids differ from the manifest",
        ("eval", "--run", "{tmp}/run"),
        2,
        "shard {shards}/test-000000.tar holds sample",
        setup=steps(edit_manifest(renamed_test_id), run_folder(_checkpoint)),
        needs=("shards",),
        timeout_s=SLOW_S,
        untouched=("{shards}",),
        absent=("{tmp}/run/eval_test.json", "{tmp}/run/report.md"),
    ),
    Case(
        "training shards at another size than the manifest",
        (*TRAIN, *ONE_EPOCH),
        2,
        "is 64×64 px but {shards}/manifest.json says image_px=128",
        setup=shrunk_train_shards,
        needs=("shards",),
        timeout_s=SLOW_S,
        untouched=("{shards}",),
        absent=("{tmp}/run/checkpoints",),
    ),
    Case(
        "second trainer on a locked run folder",
        (*TRAIN, *ONE_EPOCH),
        2,
        "run folder {tmp}/run is being trained by {holder} (since ",
        setup=lock_held,
        needs=("shards",),
        timeout_s=SLOW_S,
        untouched=("{tmp}/run",),
    ),
    Case(
        "stale lock of a dead process",
        (*TRAIN, *ONE_EPOCH),
        0,
        "took over {tmp}/run/.lock left by PID 4242 on host node-that-died",
        setup=stale_lock,
        needs=("shards",),
        timeout_s=SLOW_S,
    ),
]


def _changes(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "run" / "config_changes.jsonl").read_text().splitlines()]


def _allowed_lr(tmp: Path) -> None:
    from hpc_drseg.config import load_config

    assert load_config(tmp / "run" / "config.yaml").optim.lr == 1e-3  # config.yaml says what ran
    [record] = _changes(tmp)
    assert record["changes"]["optim.lr"] == {"old": 1e-4, "new": 1e-3}
    assert record["needed_allow_config_change"] == ["optim.lr"] and record["host"] == socket.gethostname()


def _allowed_epochs(tmp: Path) -> None:
    from hpc_drseg.config import load_config

    assert load_config(tmp / "run" / "config.yaml").train.max_epochs == 2
    [record] = _changes(tmp)
    assert record["changes"] == {"train.max_epochs": {"old": 1, "new": 2}}
    assert record["needed_allow_config_change"] == []
    assert len((tmp / "run" / "metrics.csv").read_text().splitlines()) == 3  # both epochs' rows


def _lock_taken_over(tmp: Path) -> None:
    assert (tmp / "run" / ".lock").read_text() == ""  # the new holder's record, emptied when it released the lock
    assert (tmp / "run" / "checkpoints" / "last.pt").is_file()


AFTER = {
    "resume with a changed lr, allowed": _allowed_lr,
    "resume-safe change": _allowed_epochs,
    "stale lock of a dead process": _lock_taken_over,
}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_run_safety(case, check, tmp_path):
    check(case)
    AFTER.get(case.id, lambda tmp: None)(tmp_path)
