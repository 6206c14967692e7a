"""The sweep spec's schema and loader: a base run config, the keys to vary (grid, explicit points, random search),
seeds, and where the trials run. Same rules as the run config: defaults here, YAML < dotted overrides. The trials are
expanded and run by the hpc_drseg.sweep package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hpc_drseg.config.checks import ConfigError, check_positive, check_range
from hpc_drseg.config.choices import CheckpointChoice, EvalProtocol, ExecutorKind, MonitorMode, SweepDistribution
from hpc_drseg.config.loader import build_dataclass, fix_yaml_floats, merge, parse_overrides, read_yaml
from hpc_drseg.errors import MissingError


@dataclass
class SweepParam:
    key: str = ""
    """Dotted run-config key to sample, e.g. optim.lr."""
    dist: SweepDistribution = "choice"
    """Distribution: 'choice' among `values`, 'uniform' or 'loguniform' in [low, high]."""
    values: list[Any] = field(default_factory=list)
    """Candidates of 'choice'."""
    low: Optional[float] = None
    """Lower bound of 'uniform'/'loguniform' (> 0 for loguniform)."""
    high: Optional[float] = None
    """Upper bound of 'uniform'/'loguniform'."""

    def __post_init__(self) -> None:
        _check_run_key(f"random.params[{self.key or '?'}].key", self.key)
        where = f"random.params[{self.key}]"
        if self.dist == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ConfigError(f"{where}: 'choice' needs a non-empty `values` list and no low/high")
            return
        if self.values or self.low is None or self.high is None or not self.low < self.high:
            raise ConfigError(
                f"{where}: '{self.dist}' needs low < high and no `values`; got low={self.low}, high={self.high}"
            )
        if self.dist == "loguniform" and self.low <= 0:
            raise ConfigError(f"{where}: 'loguniform' needs low > 0; got {self.low}")


@dataclass
class SweepRandomConfig:
    trials: int = 0
    """Random configurations to draw (0 = no random search)."""
    seed: int = 0
    """Seed of the draw (same seed, same configurations)."""
    params: list[SweepParam] = field(default_factory=list)
    """Keys to sample and their distributions."""

    def __post_init__(self) -> None:
        check_range("random.trials", self.trials, 0, 100_000)
        if self.trials and not self.params:
            raise ConfigError("random.params: random.trials > 0 needs at least one parameter to sample")
        keys = [p.key for p in self.params]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"random.params: a key is listed twice in {keys}")


@dataclass
class SweepExecutorConfig:
    kind: ExecutorKind = "slurm"
    """'slurm' (submitit job array), 'local' (submitit processes on this machine), 'debug' (in-process, sequential)."""
    partition: Optional[str] = None
    """SLURM partition; None = the cluster's default."""
    timeout_min: int = 24 * 60
    """Time limit of one array member in minutes; on timeout it checkpoints and requeues itself."""
    gpus_per_node: int = 1
    """GPUs of one array member (0 = CPU only); trials are spread one per GPU."""
    cpus_per_task: int = 8
    """CPU cores of one array member (data workers of all its trials)."""
    mem_gb: Optional[int] = None
    """Memory of one array member in GB; None = the cluster's default."""
    slurm_array_parallelism: int = 16
    """At most this many array members run at once (also the local executor's limit)."""
    trials_per_gpu: int = 1
    """Trials packed on one GPU; they run concurrently, each in its own process."""
    max_num_timeout: int = 3
    """Requeues after a time-out before a member gives up (preemptions do not count)."""
    signal_delay_s: int = 120
    """SIGUSR2 this many seconds before the time limit, so that running trials can checkpoint."""
    slurm_additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options, e.g. {account: proj, qos: high, constraint: h100}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each member (e.g. 'module load cuda')."""

    def __post_init__(self) -> None:
        for name in ("timeout_min", "slurm_array_parallelism", "trials_per_gpu", "cpus_per_task", "signal_delay_s"):
            check_positive(f"executor.{name}", getattr(self, name))
        check_range("executor.gpus_per_node", self.gpus_per_node, 0, 64)
        check_range("executor.max_num_timeout", self.max_num_timeout, 0, 1000)
        if self.mem_gb is not None:
            check_positive("executor.mem_gb", self.mem_gb)


@dataclass
class SweepEvalConfig:
    split: str = "test"
    """Split each trial is scored on by `drseg eval` after training."""
    protocol: EvalProtocol = "both"
    """Evaluation protocol(s) of that score."""
    checkpoint: CheckpointChoice = "auto"
    """Checkpoint evaluated (auto = best, else last)."""
    rank_by: str = "val/mAP"
    """Summary column that ranks configurations, e.g. val/mAP or test/standard/mAP."""
    rank_mode: MonitorMode = "max"
    """Whether a higher (max) or lower (min) rank_by is better."""


@dataclass
class SweepConfig:
    name: str = "sweep"
    """Sweep name (defaults to the sweep file's stem); names the SLURM job and the default sweep_dir."""
    base_config: Optional[str] = None
    """Run config every trial starts from (relative: to the sweep file's folder, else the current one)."""
    overrides: list[str] = field(default_factory=list)
    """Fixed key=value overrides of every trial, e.g. [data.shards=/data/shards]."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted key → values; every combination is one configuration."""
    points: list[list[str]] = field(default_factory=list)
    """Extra configurations, each a list of key=value overrides (ablation rows that are not a product)."""
    random: SweepRandomConfig = field(default_factory=SweepRandomConfig)
    """Random search; its configurations are added to the grid's."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Every configuration is trained once per seed (train.seed)."""
    sweep_dir: Optional[str] = None
    """Output folder; None = sweeps/<name>."""
    workdir: Optional[str] = None
    """Working directory of every trial (relative paths in overrides); None = where the sweep is started."""
    executor: SweepExecutorConfig = field(default_factory=SweepExecutorConfig)
    """Where and how the trials run."""
    eval: SweepEvalConfig = field(default_factory=SweepEvalConfig)
    """Scoring of every trial and ranking of the summary."""

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds: got {self.seeds}; give distinct non-negative integers, e.g. [0, 1, 2]")
        for key, values in self.grid.items():
            _check_run_key(f"grid.{key}", key)
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid.{key}: got {values!r}; give a non-empty list of values, e.g. [0.5, 1.0]")
            if len({yaml.safe_dump(v) for v in values}) != len(values):
                raise ConfigError(f"grid.{key}: got {values}; a value is repeated")
        clash = set(self.grid) & {p.key for p in self.random.params}
        if clash:
            raise ConfigError(f"grid and random.params both vary {sorted(clash)}; vary each key in one place")
        if not (self.grid or self.points or self.random.trials):
            raise ConfigError("a sweep needs `grid`, `points` or `random` (with trials > 0); otherwise use drseg train")


def _check_run_key(where: str, key: str) -> None:
    """A swept key must be a dotted run-config key the sweep does not set itself."""
    if not isinstance(key, str) or "." not in key.strip("."):
        raise ConfigError(f"{where}: got {key!r}; give a dotted run-config key, e.g. loss.weights.dice")
    if key in ("train.seed", "train.run_dir"):
        raise ConfigError(f"{where}: the sweep sets {key} itself; list seeds under `seeds` instead")


def _flatten_keys(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'loss': {'weights': {'dice': [..]}}} → {'loss.weights.dice': [..]}: grid keys may be nested or dotted."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten_keys(value, f"{prefix}{key}."))
    return flat


def load_sweep_config(path: str | Path, overrides: Optional[list[str]] = None) -> SweepConfig:
    """Defaults < sweep YAML < dotted overrides (e.g. executor.kind=local seeds=[0,1]); base_config made absolute."""
    path = Path(path)
    values = read_yaml(path, SweepConfig)
    values.setdefault("name", path.stem)
    updates = fix_yaml_floats(parse_overrides(list(overrides or [])))  # grid.optim.lr=[1e-3]: '1e-3' is a float
    grid = {}
    for source in (values, updates):
        if isinstance(source.get("grid"), dict):
            grid.update(_flatten_keys(source.pop("grid")))
    values = merge(values, updates)
    if grid:
        values["grid"] = grid
    spec = build_dataclass(SweepConfig, values)
    if spec.base_config is not None:
        spec.base_config = str(_find_base_config(Path(spec.base_config), path))
    return spec


def _find_base_config(base: Path, sweep_file: Path) -> Path:
    candidates = [base] if base.is_absolute() else [sweep_file.parent / base, Path.cwd() / base]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked_at = ", ".join(str(c) for c in candidates)
    raise MissingError(
        f"{sweep_file}: base_config {base} not found (looked at {looked_at}); give a path to a run config YAML"
    )
