"""Experiment trackers of a run (train.trackers): Accelerate's TensorBoard, MLflow and W&B trackers, bound to the run.

TensorBoard: events in RUN/tb. MLflow: experiment = the run's name, tracking store RUN/mlruns (a local file store)
unless MLFLOW_TRACKING_URI is set. W&B: project = the run's name, files under RUN/wandb, online unless
WANDB_MODE=offline. They are handed to `Accelerator(log_with=...)` built, not started; rank 0 starts them under the
run's lock (RunLogger). The tracker runs MLflow and W&B create are recorded in RUN/trackers.json, so that a resumed
run goes on logging into the same tracker run instead of starting a new one at each resume.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker, on_main_process

from hpc_drseg.atomic import atomic_write_json
from hpc_drseg.config import RunConfig
from hpc_drseg.config.checks import ConfigError
from hpc_drseg.config.loader import config_to_dict

log = logging.getLogger("hpc_drseg.train")

TB_DIR = "tb"
MLFLOW_DIR = "mlruns"
TRACKERS_FILE = "trackers.json"
# The module each tracker imports, and what installs it (pyproject.toml extras; TensorBoard is a core dependency).
REQUIREMENTS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install -e '.[mlflow]'"),
    "wandb": ("wandb", "pip install -e '.[wandb]'"),
}


def check_trackers(names: list[str]) -> None:
    """A tracker whose package is missing is a config error now, not an import error after the first epoch."""
    for name in names:
        module, install = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.trackers: {name} needs the '{module}' package, which is not installed; {install}, "
                f"or remove {name} from train.trackers"
            )


def build_trackers(cfg: RunConfig) -> list[GeneralTracker]:
    """The trackers of cfg.train.trackers for `Accelerator(log_with=...)`; nothing is started or written yet."""
    check_trackers(cfg.train.trackers)
    run_dir, params = cfg.run_dir, flat_params(config_to_dict(cfg))
    makers = {
        "tensorboard": lambda: TensorBoardTracker(TB_DIR, run_dir),  # logging_dir/run_name = RUN/tb
        "mlflow": lambda: RunMLflowTracker(run_dir, cfg.name, params),
        "wandb": lambda: RunWandBTracker(run_dir, cfg.name, params),
    }
    return [makers[name]() for name in cfg.train.trackers]


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 0.0001, "model.aspp_rates": "[6, 12, 18]", ...}: the scalar values trackers take as parameters."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def read_tracker_runs(run_dir: Path) -> dict[str, Any]:
    """RUN/trackers.json: {"mlflow": {"run_id", "tracking_uri" (null: RUN/mlruns)}, "wandb": {"id"}}; {} if new."""
    path = Path(run_dir) / TRACKERS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s): the trackers start new runs", path, exc)
        return {}


def record_tracker_run(run_dir: Path, name: str, entry: dict[str, Any]) -> None:
    runs = read_tracker_runs(run_dir)
    runs[name] = entry
    atomic_write_json(Path(run_dir) / TRACKERS_FILE, runs)


def use_mlflow_store(run_dir: Path) -> Optional[str]:
    """Points MLflow at MLFLOW_TRACKING_URI when the user set it (returned), else at the run folder's own store (None
    returned), never at MLflow's default, ./mlruns in whatever folder the job started in. That store is a plain folder,
    which suits cluster file systems (a sqlite store needs working file locks): MLflow 3 keeps it in maintenance mode
    behind MLFLOW_ALLOW_FILE_STORE. A run logged into its own folder contacts nothing: MLflow's usage telemetry is off
    unless the user says otherwise."""
    user_uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    if user_uri is None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read once, when mlflow is first imported
    import mlflow

    # Always set: one set by an earlier run in this process would win over the environment variable.
    mlflow.set_tracking_uri(user_uri or (Path(run_dir) / MLFLOW_DIR).resolve().as_uri())
    return user_uri


def _mlflow_run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


class RunMLflowTracker(MLflowTracker):
    """Accelerate's MLflow tracker in the run's store, continuing the run's MLflow run when it resumes."""

    def __init__(self, run_dir: Path, name: str, params: dict[str, Any]) -> None:
        super().__init__(experiment_name=name, run_name=name)  # MLFLOW_EXPERIMENT_NAME / MLFLOW_RUN_ID still win
        self.run_dir, self.params = Path(run_dir), params
        self.in_run_folder = False  # started on RUN/mlruns (whose URI mlflow then exports as MLFLOW_TRACKING_URI)

    @on_main_process
    def start(self) -> None:
        # The store is recorded as the user's URI, or null for RUN/mlruns: a run folder that moved keeps its run.
        user_uri = use_mlflow_store(self.run_dir)
        self.in_run_folder = user_uri is None
        stored = read_tracker_runs(self.run_dir).get("mlflow", {})
        if self.run_id is None and stored.get("run_id") and stored.get("tracking_uri") == user_uri:
            if _mlflow_run_exists(stored["run_id"]):
                self.run_id = stored["run_id"]
            else:
                log.warning("MLflow run %s is not in its store: logging into a new run", stored["run_id"])
        new = self.run_id is None
        super().start()
        if new:  # MLflow refuses to change a parameter of an existing run (a config change on resume would)
            self.store_init_configuration(self.params)
        record_tracker_run(self.run_dir, "mlflow", {"run_id": self.active_run.info.run_id, "tracking_uri": user_uri})

    @on_main_process
    def finish(self) -> None:
        super().finish()
        if self.in_run_folder:
            import mlflow

            # mlflow.set_tracking_uri also set MLFLOW_TRACKING_URI for subprocesses: unset, so that a later run in
            # this process does not take this run's store for one the user chose.
            mlflow.set_tracking_uri(None)
            self.in_run_folder = False


class RunWandBTracker(WandBTracker):
    """Accelerate's W&B tracker with its files in the run folder, continuing the run's W&B run when it resumes."""

    def __init__(self, run_dir: Path, name: str, params: dict[str, Any]) -> None:
        super().__init__(name, dir=str(run_dir), name=name)
        self.run_dir, self.params = Path(run_dir), params

    @on_main_process
    def start(self) -> None:
        stored = read_tracker_runs(self.run_dir).get("wandb", {}).get("id")
        if stored is None:
            self.init_kwargs["config"] = self.params
        else:
            self.init_kwargs.update(id=stored, resume="allow")
        super().start()
        record_tracker_run(self.run_dir, "wandb", {"id": self.run.id})
