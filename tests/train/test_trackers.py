"""train.trackers: the list is checked before anything slow, and a real tiny run logs to MLflow's local file store in
the run folder (read back with MLflow's client and compared with metrics.csv), continued by a resume rather than
started anew; TensorBoard events stay in RUN/tb."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from hpc_drseg.config import ConfigError, load_config
from hpc_drseg.train import logs, trackers
from hpc_drseg.train.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[2]
DEBUG_YAML = REPO / "configs" / "debug.yaml"
# tests/train/test_trainer.py's tiny CPU run: ResNet-18 Attention-DeepLab at 128 px, 3 steps an epoch.
TINY = ["train.steps_per_epoch=3", "data.augment.preset=paper", "eval.score_bits=8"]
# What would point MLflow elsewhere than the run folder (or name its experiment or run) when a user sets it.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_ALLOW_FILE_STORE")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[tensorboard,neptune]", "train.trackers[1]: got 'neptune'; choose one of ['tensorboard', 'mlflow', 'wandb']"),
        ("[mlflow,wandb,mlflow]", "train.trackers: got ['mlflow', 'wandb', 'mlflow']; list each entry once"),
    ],
)
def test_unknown_or_repeated_tracker_is_a_config_error(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(DEBUG_YAML, [f"train.trackers={value}"])
    assert str(error.value) == message


def test_default_is_tensorboard_and_an_empty_list_is_allowed() -> None:
    assert load_config(None).train.trackers == ["tensorboard"]
    assert load_config(None, ["train.trackers=[]"]).train.trackers == []


def test_missing_tracker_package_stops_the_trainer_before_anything_slow(tmp_path: Path, monkeypatch) -> None:
    # The requirement table is what the check reads: a module name that cannot exist stands for an uninstalled wandb.
    monkeypatch.setitem(trackers.REQUIREMENTS, "wandb", ("no_such_tracker_module", "pip install -e '.[wandb]'"))
    # No shards at all: the tracker error must come first, before the manifest is read or the model built.
    cfg = load_config(DEBUG_YAML, [f"data.shards={tmp_path / 'none'}", "train.trackers=[tensorboard,wandb]"])
    with pytest.raises(ConfigError) as error:
        Trainer(cfg)
    message = str(error.value)
    assert "train.trackers: wandb needs the 'no_such_tracker_module' package" in message
    assert "pip install -e '.[wandb]'" in message and "\n" not in message


def test_flat_params_are_scalars_with_dotted_keys() -> None:
    params = trackers.flat_params({"optim": {"lr": 1e-4, "betas": [0.9, 0.999]}, "model": {"path": None}})
    assert params == {"optim.lr": 1e-4, "optim.betas": "[0.9, 0.999]", "model.path": None}


def overrides(shards_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards_dir}", f"train.run_dir={run_dir}", *TINY, *extra]


def _metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_mlflow_matches_csv(client, run_id: str, run_dir: Path) -> None:
    rows = _metrics_csv(run_dir)
    for column in ("val/mAP", "val/loss", "train/total", "lr"):
        history = sorted(client.get_metric_history(run_id, f"epoch/{column}"), key=lambda m: m.step)
        assert [m.step for m in history] == [int(row["step"]) for row in rows], column
        for metric, row in zip(history, rows):
            assert math.isclose(metric.value, float(row[column]), rel_tol=1e-9, abs_tol=1e-12), column


def test_mlflow_logs_into_the_run_folder_and_resumes_the_same_run(shards_dir, tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    monkeypatch.setattr(logs, "CURVES_TIME_SHARE", math.inf)  # the curves after every epoch, however short
    run_dir = tmp_path / "run"
    tracked = overrides(shards_dir, run_dir, "train.trackers=[tensorboard,mlflow]", "name=tiny_tracked")
    assert train(load_config(DEBUG_YAML, tracked)).exit_code == 0

    assert not (tmp_path / "mlruns").exists()
    assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow exports the store it is given; not left for a later run
    stored = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert stored["tracking_uri"] is None  # the run folder's own store
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny_tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [stored["run_id"]]
    assert runs[0].data.params["optim.lr"] == "0.0001" and runs[0].data.params["train.max_epochs"] == "2"
    assert len(client.get_metric_history(stored["run_id"], "train/total")) == 6  # log_every_steps=1, 3 steps x 2
    _assert_mlflow_matches_csv(client, stored["run_id"], run_dir)
    assert any(path.name.startswith("events.out.tfevents") for path in (run_dir / "tb").iterdir())
    assert (run_dir / "plots" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "validate" in capsys.readouterr().err  # the validation progress bar

    # A resume starts the tracker again from the run folder: the same MLflow run goes on, its parameters kept (a
    # changed value would make MLflow refuse to log them again).
    again = trackers.RunMLflowTracker(run_dir, "tiny_tracked", {"optim.lr": 0.5})
    again.start()
    again.log({"epoch/val/mAP": 0.25}, step=99)
    again.finish()
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [stored["run_id"]] and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["optim.lr"] == "0.0001"
    assert client.get_metric_history(stored["run_id"], "epoch/val/mAP")[-1].step == 99


def test_a_tracker_that_fails_to_start_is_the_error_reported(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.exceptions import MlflowException

    from hpc_drseg.train.logs import RunLogger
    from hpc_drseg.train.runtime import build_accelerator

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://store")  # MLflow has no store for it
    cfg = load_config(DEBUG_YAML, [f"train.run_dir={tmp_path / 'run'}", "train.trackers=[tensorboard,mlflow]"])
    accelerator = build_accelerator(cfg.train, log_with=trackers.build_trackers(cfg))
    with pytest.raises(MlflowException):
        RunLogger(cfg.run_dir, True, [], accelerator=accelerator)
    # TensorBoard had started and is closed; nothing is left for end_training to finish (it would fail over the error).
    assert accelerator.trackers == []
    accelerator.end_training()
