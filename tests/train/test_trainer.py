"""Real training runs on CPU: one process, exact resume after max_steps and after SIGTERM, 2-process DDP on gloo
(torchrun and accelerate launch), DeepSpeed ZeRO-2 through Accelerate; the run folder's safety: config changes on
resume, the lock, inputs checked before step 0, checkpoints of a compiled model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from hpc_drseg.config import load_config
from hpc_drseg.train import deepspeed_state
from hpc_drseg.train.checkpoint import checkpoint_path, load_checkpoint
from hpc_drseg.train.signals import EXIT_RESUMABLE
from hpc_drseg.train.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[2]
DEBUG_YAML = REPO / "configs" / "debug.yaml"
# Small enough for 2 cores: ResNet-18 Attention-DeepLab at the fixture shards' 128 px, 3 steps an epoch.
TINY = ["train.steps_per_epoch=3", "data.augment.preset=paper", "eval.score_bits=8"]


def overrides(shards_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards_dir}", f"train.run_dir={run_dir}", *TINY, *extra]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint_path(run_dir, "last"))["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference_run(shards_dir, tmp_path_factory) -> Path:
    """Two uninterrupted epochs; the resume tests must end on exactly these weights."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train(load_config(DEBUG_YAML, overrides(shards_dir, run_dir)))
    assert result.exit_code == 0 and result.progress.global_step == 6
    return run_dir


def test_run_directory_contents(reference_run):
    files = {p.name for p in reference_run.iterdir()}
    assert {"config.yaml", "metrics.csv", "checkpoints", "tb"} <= files
    state = torch.load(checkpoint_path(reference_run, "last"), weights_only=True)
    assert state["progress"]["epoch"] == 2 and state["progress"]["global_step"] == 6
    assert checkpoint_path(reference_run, "best").is_file()
    rows = (reference_run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "val/mAP" in rows[0] and "train/boundary" in rows[0]
    assert load_config(reference_run / "config.yaml").train.steps_per_epoch == 3


def test_resume_after_max_steps_is_exact(shards_dir, tmp_path, reference_run):
    run_dir = tmp_path / "run"
    first = train(load_config(DEBUG_YAML, overrides(shards_dir, run_dir, "train.max_steps=4")))
    assert first.exit_code == 0 and first.progress.global_step == 4 and first.progress.step_in_epoch == 1
    second = train(load_config(DEBUG_YAML, overrides(shards_dir, run_dir)))
    assert second.progress.global_step == 6
    assert_same_weights(final_weights(run_dir), final_weights(reference_run))


def test_sigterm_checkpoints_and_resume_is_exact(shards_dir, tmp_path, reference_run):
    run_dir = tmp_path / "run"
    # Slow each step a little so the signal lands mid-run rather than after the end.
    cmd = [sys.executable, "-m", "hpc_drseg", "train", "--config", str(DEBUG_YAML), *overrides(shards_dir, run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not checkpoint_path(run_dir, "last").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # last.pt appears at the end of epoch 0; epoch 1 is then under way
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_RESUMABLE, output[-3000:]
    assert "stopped by SIGTERM" in output
    stopped_at = load_checkpoint(checkpoint_path(run_dir, "last"))["progress"]["global_step"]
    assert 3 <= stopped_at < 6
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed {checkpoint_path(run_dir, 'last')}" in done.stderr
    assert_same_weights(final_weights(run_dir), final_weights(reference_run))


def test_non_finite_loss_names_step_and_samples(shards_dir, tmp_path):
    trainer = Trainer(load_config(DEBUG_YAML, overrides(shards_dir, tmp_path / "run", "train.max_steps=3")))
    trainer.loss_fn.weights["dice"] = float("inf")  # the config refuses such weights; the guard must still hold
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* step 0 .*samples: \S+"):
        trainer.fit()


def test_mismatched_image_size_is_a_clear_error(shards_dir, tmp_path):
    cfg = load_config(DEBUG_YAML, overrides(shards_dir, tmp_path / "run", "data.image_px=256"))
    with pytest.raises(ValueError, match="set data.image_px=128 or re-shard"):
        train(cfg)


def _launch(launcher: list[str], shards_dir: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [*launcher, "-m", "hpc_drseg", "train", "--config", str(DEBUG_YAML), *overrides(shards_dir, run_dir, *extra)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def _check_two_rank_run(done: subprocess.CompletedProcess, run_dir: Path) -> None:
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "replicas identical on all 2 ranks" in log
    state = load_checkpoint(checkpoint_path(run_dir, "last"))
    assert state["world_size"] == 2 and state["progress"]["global_step"] == 3


@pytest.mark.slow
def test_ddp_two_processes_with_torchrun(shards_dir, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    run_dir = tmp_path / "run"
    _check_two_rank_run(_launch(launcher, shards_dir, run_dir, "train.max_epochs=1"), run_dir)
    _check_validation_is_that_of_rank_0(shards_dir, run_dir, tmp_path / "one_process")


def _check_validation_is_that_of_rank_0(shards_dir: Path, run_dir: Path, scratch: Path) -> None:
    """The 2 ranks' validation (each scoring half of the images) equals one process scoring all of them with the
    checkpointed weights: every rank validated with rank 0's BatchNorm statistics, not its own."""
    import csv

    from hpc_drseg.train.checkpoint import load_model_state

    with (run_dir / "metrics.csv").open() as handle:
        logged = next(csv.DictReader(handle))
    trainer = Trainer(load_config(DEBUG_YAML, overrides(shards_dir, scratch, "train.max_epochs=1")))
    state = load_checkpoint(checkpoint_path(run_dir, "last"))
    load_model_state(trainer.accelerator.unwrap_model(trainer.model), state["model"], "last.pt")
    one_process = trainer.validate()
    for key in ("val/loss", "val/mAP"):
        assert float(logged[key]) == pytest.approx(one_process[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_ddp_two_processes_with_accelerate_launch(shards_dir, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launcher += ["--num_processes", "2", "--main_process_port", "29532"]
    run_dir = tmp_path / "run"
    _check_two_rank_run(_launch(launcher, shards_dir, run_dir, "train.max_epochs=1"), run_dir)


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(shards_dir, tmp_path):
    pytest.importorskip("deepspeed")
    zero2 = REPO / "launch" / "accelerate_deepspeed_zero2.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(zero2)]
    launcher += ["--num_processes", "2", "--main_process_port", "29533"]
    run_dir = tmp_path / "run"
    done = _launch(launcher, shards_dir, run_dir, "train.max_epochs=1")
    _check_two_rank_run(done, run_dir)
    # Its partitions sit in the one step-tagged folder that last.pt names, and nothing is left half-written.
    named = load_checkpoint(checkpoint_path(run_dir, "last"))[deepspeed_state.DEEPSPEED_KEY]
    assert [p.name for p in deepspeed_state.run_folders(run_dir / "checkpoints")] == [named]


def test_channels_last_and_gradient_accumulation_run(shards_dir, tmp_path):
    extra = ["train.channels_last=true", "train.grad_accum_steps=2", "train.max_steps=2"]
    extra += ["model.use_aux_head=true", "loss.pos_weight=[4, 1, 1.5, 2]"]
    cfg = load_config(DEBUG_YAML, overrides(shards_dir, tmp_path / "run", *extra))
    result = train(cfg)
    assert result.exit_code == 0 and result.progress.global_step == 2
    state = load_checkpoint(checkpoint_path(tmp_path / "run", "last"))
    assert any(key.startswith("aux") for key in state["model"]), "aux head weights belong in the checkpoint"


# ------------------------------------------------------------------------------------------- run-folder safety
def _bytes(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture
def one_step_run(shards_dir, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    assert train(load_config(DEBUG_YAML, overrides(shards_dir, run_dir, "train.max_steps=1"))).exit_code == 0
    return run_dir


def test_resume_with_a_changed_config_stops_unless_allowed(shards_dir, one_step_run):
    run_dir, last = one_step_run, checkpoint_path(one_step_run, "last")
    before = _bytes(last), _bytes(run_dir / "config.yaml")
    changed = load_config(DEBUG_YAML, overrides(shards_dir, run_dir, "train.max_steps=2", "optim.lr=1e-3"))
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.0001 → 0\.001; .*--allow-config-change"):
        train(changed)
    assert (_bytes(last), _bytes(run_dir / "config.yaml")) == before
    assert not (run_dir / "config_changes.jsonl").exists()
    result = train(changed, allow_config_change=True)
    assert result.progress.global_step == 2
    assert load_config(run_dir / "config.yaml").optim.lr == 1e-3
    assert load_checkpoint(last)["config"]["optim"]["lr"] == 1e-3
    [record] = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert record["changes"] == {"optim.lr": {"old": 1e-4, "new": 1e-3}, "train.max_steps": {"old": 1, "new": 2}}
    assert record["needed_allow_config_change"] == ["optim.lr"] and record["global_step"] == 1


def test_resume_safe_change_is_recorded_without_the_flag(shards_dir, one_step_run):
    cfg = load_config(DEBUG_YAML, overrides(shards_dir, one_step_run, "train.max_steps=2", "data.num_workers=1"))
    assert train(cfg).progress.global_step == 2
    saved = load_config(one_step_run / "config.yaml")
    assert saved.train.max_steps == 2 and saved.data.num_workers == 1
    [record] = [json.loads(line) for line in (one_step_run / "config_changes.jsonl").read_text().splitlines()]
    assert set(record["changes"]) == {"train.max_steps", "data.num_workers"}
    assert record["needed_allow_config_change"] == []


def test_architecture_cannot_change_even_when_allowed(shards_dir, one_step_run):
    last = checkpoint_path(one_step_run, "last")
    before = _bytes(last)
    cfg = load_config(DEBUG_YAML, overrides(shards_dir, one_step_run, "model.cbam.sites=[aspp]"))
    with pytest.raises(ValueError, match=r"holds another architecture .*model\.cbam\.sites"):
        train(cfg, allow_config_change=True)
    assert _bytes(last) == before and not (one_step_run / "config_changes.jsonl").exists()


def test_second_trainer_on_a_locked_run_folder_is_refused(shards_dir, one_step_run):
    from hpc_drseg.train.lock import RunLock

    lock = RunLock.acquire(one_step_run)
    try:
        files = {p: _bytes(p) for p in one_step_run.rglob("*") if p.is_file()}
        cfg = load_config(DEBUG_YAML, overrides(shards_dir, one_step_run, "train.max_steps=2"))
        with pytest.raises(FileExistsError, match=rf"being trained by PID {os.getpid()} on host"):
            train(cfg)
        assert {p: _bytes(p) for p in one_step_run.rglob("*") if p.is_file()} == files
    finally:
        lock.release()


def _shards_without(shards_dir: Path, tmp_path: Path, split: str) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["splits"][split]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("split", ["valid", "train"])
def test_missing_split_is_found_before_anything_is_written(shards_dir, tmp_path, split):
    shards = _shards_without(shards_dir, tmp_path, split)
    with pytest.raises(ValueError, match=rf"split '{split}' is not in the shards {shards}"):
        train(load_config(DEBUG_YAML, overrides(shards, tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_missing_validation_shard_is_found_before_step_0(shards_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    (copy / "valid-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"valid-000001\.tar listed in .* is missing"):
        train(load_config(DEBUG_YAML, overrides(copy, tmp_path / "run")))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compiled_run_checkpoints_plain_keys_that_eval_and_predict_load(shards_dir, tmp_path):
    from hpc_drseg.evaluate import evaluate_run
    from hpc_drseg.predict import predict

    run_dir = tmp_path / "run"
    result = train(load_config(DEBUG_YAML, overrides(shards_dir, run_dir, "train.max_steps=1", "train.compile=true")))
    assert result.exit_code == 0
    weights = load_checkpoint(checkpoint_path(run_dir, "last"))["model"]
    assert not [key for key in weights if "_orig_mod" in key]
    assert evaluate_run(run_dir, split="valid", which="last")["images"] == 4
    photo = tmp_path / "eye.png"
    cv2.imwrite(str(photo), np.full((96, 112, 3), 90, np.uint8))
    assert list(predict(checkpoint_path(run_dir, "last"), photo, tmp_path / "out")["images"]) == ["eye.png"]
